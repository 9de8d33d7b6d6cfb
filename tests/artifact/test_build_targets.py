"""Build + validate every target on tiny configs (E 4/8, top-k 1/2, fp32/fp16) and check what OUT holds."""

from __future__ import annotations

import json

import pytest

from artifact.shared import CONFIGS, RANGES, built, targets_of
from mixexport import graph_io
from mixexport.artifact.manifest import read_manifest, sha256_file
from mixexport.checkpoint.config import preset
from mixexport.validate.parity import MIN_ROUTER_AGREEMENT, REPORT_FILE

pytestmark = pytest.mark.parametrize("name", list(CONFIGS))


def _config(name):
    experts, top_k, dtype = CONFIGS[name]
    return preset("tiny").replace(num_local_experts=experts, num_experts_per_tok=top_k, dtype=dtype)


def test_every_target_passes_parity(name, tmp_path_factory):
    out, manifest, _ = built(name, tmp_path_factory)
    validation = manifest.validation
    assert validation["passed"] is True
    assert validation["failed_targets"] == []
    assert validation["targets"] == {t: "pass" for t in targets_of(name)}
    assert validation["compared"] == len(targets_of(name)) and validation["not_validated"] == []
    for target in targets_of(name):
        agreement = validation["router_agreement"][target]
        assert agreement is not None and agreement >= MIN_ROUTER_AGREEMENT, (target, agreement)


def test_validation_report_written(name, tmp_path_factory):
    out, manifest, _ = built(name, tmp_path_factory)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["passed"] is True
    assert report["dtype"] == CONFIGS[name][2]
    assert report["min_router_agreement"] == MIN_ROUTER_AGREEMENT
    assert report["scenario"]["batch"] == 2 and report["scenario"]["decode_steps"] == 4
    for target in targets_of(name):
        entry = report["targets"][target]
        assert entry["status"] == "pass"
        assert entry["failed_outputs"] == []
        assert set(entry["max_abs_diff"]) == {"logits", "present", "router_logits"}
        # Within the report's own tolerance for logits, so a pass is not vacuous.
        assert entry["max_abs_diff"]["logits"] <= report["tolerances"]["logits"]["atol"] * 50


def test_manifest_files_hashes_bindings_dims(name, tmp_path_factory):
    out, manifest, _ = built(name, tmp_path_factory)
    on_disk = read_manifest(out).to_json()
    assert on_disk == manifest.to_json()
    config = _config(name)
    dtype = CONFIGS[name][2]
    assert on_disk["dtype"] == dtype
    assert on_disk["model"]["num_local_experts"] == config.num_local_experts
    assert on_disk["model"]["num_experts_per_tok"] == config.num_experts_per_tok
    assert on_disk["source"]["kind"] == "preset" and on_disk["source"]["preset"] == "tiny"
    total = RANGES["max_context"]
    assert on_disk["dynamic_dims"] == {
        graph_io.BATCH: [1, RANGES["max_batch"]], graph_io.SEQUENCE: [1, RANGES["max_sequence"]],
        graph_io.PAST: [0, total - 1], graph_io.TOTAL: [1, total]}
    assert set(on_disk["targets"]) == set(targets_of(name))
    for target, entry in on_disk["targets"].items():
        paths = sorted(f["path"] for f in entry["files"])  # (the trt kernels are listed apart)
        runtime = [] if target == "trt" else [  # genai's and Optimum's, and init's tokenizer
            "config.json", "generation_config.json", "genai_config.json", "tokenizer.json", "tokenizer_config.json"]
        assert paths == sorted(f"{target}/{name}" for name in ["model.onnx", "model.onnx.data", *runtime])
        for f in entry["files"]:
            path = out / f["path"]
            assert path.stat().st_size == f["bytes"]
            assert sha256_file(path) == f["sha256"]
        assert entry["onnx"] == f"{target}/model.onnx"
        assert entry["dtype"] == dtype
        assert entry["inputs"] == [b.as_dict() for b in graph_io.inputs(config, dtype)]
        assert entry["outputs"] == [b.as_dict() for b in graph_io.outputs(config, dtype)]
        assert entry["moe_nodes"] == config.num_hidden_layers
        assert entry["passes"][f"lower_moe_{target}"] == config.num_hidden_layers


def test_no_temporary_directories_left(name, tmp_path_factory):
    out, _, _ = built(name, tmp_path_factory)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
