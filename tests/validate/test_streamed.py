"""Layer-streamed validation: it agrees with whole-model validation, it finds a broken layer and
names it, and `auto` picks it when the whole model does not fit in memory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from artifact.shared import RANGES, error_line, run_cli, targets_of, unvalidated_build
from mixexport import graph_io
from mixexport.artifact.manifest import file_entry
from mixexport.checkpoint import Checkpoint
from mixexport.driver.build import BuildOptions, build, reference_source
from mixexport.validate.parity import REPORT_FILE, validate_out
from mixexport.model.decoder import load_reference
from mixexport.passes.stages import layer_stages
from mixexport.validate.streamed import _ReferencePart, _scenario, choose_mode
from validate.test_hf_checkpoint import write_hf_checkpoint
from validate.test_parity_failure import corrupt_moe_weights


def _agree(out, checkpoint=None):
    """Whole and streamed reports of OUT: the same verdicts, max differences within tolerance."""
    whole, _ = validate_out(out, checkpoint, mode="whole")
    streamed, _ = validate_out(out, checkpoint, mode="streamed")
    assert (whole["summary"]["mode"], streamed["summary"]["mode"]) == ("whole", "streamed")
    assert whole["passed"] and streamed["passed"], (whole["targets"], streamed["targets"])
    assert set(whole["targets"]) == set(streamed["targets"]) and len(streamed["targets"]) >= 2
    for target, result in streamed["targets"].items():
        assert result["status"] == whole["targets"][target]["status"] == "pass"
        assert result["router_agreement"] == 1.0
        assert set(result["max_abs_diff"]) == {"logits", "present", "router_logits", "hidden_states"}
        for group, diff in result["max_abs_diff"].items():
            assert diff <= streamed["tolerances"][group]["atol"], (target, group, diff)
        # Teacher forcing per layer: never further from the reference than the whole graph.
        for group in ("logits", "present"):
            assert result["max_abs_diff"][group] <= whole["targets"][target]["max_abs_diff"][group] + 1e-3
    return whole, streamed


@pytest.mark.parametrize("name", ["e4-k2-float16", "e8-k1-float32"])
def test_streamed_agrees_with_whole_on_tiny(name, tmp_path_factory):
    out, _, _ = unvalidated_build(name, targets_of(name), tmp_path_factory)
    _agree(out)


def _build(tmp_path_factory, checkpoint, preset, dtype):
    out = tmp_path_factory.mktemp("streamed") / "out"
    with reference_source(checkpoint, preset, 0, {}, lambda _: None) as (ckpt, source):
        build(ckpt, source, out, BuildOptions(targets=("portable", "ort", "trt"), dtype=dtype, validate=False,
                                              **RANGES), lambda _: None)
    return out


def test_streamed_agrees_with_whole_on_small(tmp_path_factory):
    _agree(_build(tmp_path_factory, None, "small", "float16"))


def test_streamed_agrees_with_whole_on_a_transformers_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "checkpoint"
    write_hf_checkpoint(path, hidden=64, intermediate=96)  # shapes the trt plugin's kernels take
    _agree(_build(tmp_path_factory, path, None, "float16"), path)


def _corrupt_layer(out, layer: int) -> None:
    """Negate layer `layer`'s ort expert weights in OUT (hashes re-recorded, so the numerics are reached)."""
    corrupt_moe_weights(out, layer)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["targets"]["ort"]["files"] = [file_entry(out / f["path"], out) for f in manifest["targets"]["ort"]["files"]]
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("layer", [0, 1])
def test_a_corrupted_layer_fails_streamed_validation_naming_it(layer, tmp_path_factory, tmp_path):
    out, _, _ = unvalidated_build("e4-k2-float32", ("portable", "ort"), tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    _corrupt_layer(copy, layer)
    result = run_cli("validate", copy, "--validation-mode", "streamed")
    assert error_line(result) == "error: parity failed for ort (tolerances float32: see the report)"
    assert "validation mode: streamed (forced" in result.output
    assert f"streamed validation: stage {layer + 2}/4 (layers.{layer}-{layer}) compared" in result.output
    report = json.loads((copy / REPORT_FILE).read_text())
    assert report["mode"] == report["summary"]["mode"] == "streamed"
    assert report["targets"]["portable"]["status"] == "pass"
    ort = report["targets"]["ort"]
    # Teacher forcing: only the broken layer's stage fails; the layers after it get the reference's input.
    assert ort["status"] == "fail" and ort["failed_stages"] == [f"layers.{layer}-{layer}"]
    assert f"hidden_states.{layer + 1}" in ort["failed_outputs"]
    assert ort["reason"] == f"outside tolerance in layers.{layer}-{layer}"


def test_auto_streams_what_does_not_fit(tiny_config, monkeypatch):
    lines = []
    monkeypatch.setattr("mixexport.validate.streamed.memory_available", lambda: 1000)
    assert choose_mode("auto", tiny_config, "float32", lines.append) == "streamed"
    assert choose_mode("whole", tiny_config, "float32", lines.append) == "whole"
    monkeypatch.setattr("mixexport.validate.streamed.memory_available", lambda: 10**12)
    assert choose_mode("auto", tiny_config, "float32", lines.append) == "whole"
    assert choose_mode("streamed", tiny_config, "float32", lines.append) == "streamed"
    assert lines[0].startswith("validation mode: streamed (the whole model does not fit; whole-model validation "
                               "would hold about 0.5 GB, 0.0 GB available)")
    assert lines[1].startswith("validation mode: whole (forced;")
    assert lines[2].startswith("validation mode: whole (it fits;")


def test_build_streams_when_memory_is_short(tmp_path, monkeypatch):
    monkeypatch.setattr("mixexport.validate.streamed.memory_available", lambda: 1000)
    result = run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", "--target", "ort")
    assert result.exit_code == 0, result.output
    assert "validation mode: streamed (the whole model does not fit" in result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["validation"]["mode"] == "streamed" and manifest["validation"]["passed"]


@pytest.mark.parametrize("layers_per_stage", [1, 2])
def test_the_streamed_reference_is_the_whole_reference_bit_for_bit(layers_per_stage, tiny_config,
                                                                    checkpoint_factory):
    """Stage by stage, layer by layer with every step's MoE at once, the reference computes exactly
    what the whole decoder computes step by step (fed the same boundary tensors)."""
    ckpt = Checkpoint(checkpoint_factory(tiny_config))
    model = load_reference(ckpt, dtype=torch.float16)
    steps = _scenario(tiny_config, decode_steps=3)
    past, expected = model.empty_cache(2), []
    with torch.no_grad():
        for step in steps:
            logits, past = model(step["input_ids"], step["attention_mask"], step["position_ids"], past)
            expected.append((logits, past))
    hidden = [None] * len(steps)
    for stage in layer_stages(tiny_config.num_hidden_layers, layers_per_stage):
        outs = _ReferencePart(ckpt, stage, torch.float16).run(
            [{**step, graph_io.hidden_state_name(stage.first): h} for step, h in zip(steps, hidden)])
        for out, (logits, present) in zip(outs, expected):
            for i in range(stage.first, stage.end):
                for name, tensor in zip(graph_io.present_names(i), present[i]):
                    assert torch.equal(out[name], tensor), name
        hidden = [out.get(graph_io.hidden_state_name(stage.end)) for out in outs]
    assert all(torch.equal(out["logits"], logits) for out, (logits, _) in zip(outs, expected))


def test_no_session_is_created_while_a_reference_stage_is_held(tmp_path_factory, monkeypatch):
    """The peak memory of streamed validation is one stage: the reference's weights of a stage are
    freed before onnxruntime loads that stage's (for an 8x7B layer: 2.8 GB plus 5.6 GB)."""
    import weakref

    import onnxruntime

    from mixexport.validate import streamed

    out, _, _ = unvalidated_build("e4-k2-float16", ("ort",), tmp_path_factory)
    parts, sessions = [], []
    init, session = streamed._ReferencePart.__init__, onnxruntime.InferenceSession

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        parts.append(weakref.ref(self))

    def checked_session(*args, **kwargs):
        sessions.append([part() for part in parts if part() is not None])
        return session(*args, **kwargs)
    monkeypatch.setattr(streamed._ReferencePart, "__init__", tracked_init)
    monkeypatch.setattr(onnxruntime, "InferenceSession", checked_session)
    report, _ = validate_out(out, mode="streamed")
    assert report["passed"] and len(sessions) == len(parts) == 4  # embedding, 2 layers, head
    assert sessions == [[]] * 4, "a reference stage was alive while a session loaded"


def test_streamed_validate_reads_each_checkpoint_tensor_once(tmp_path_factory, monkeypatch):
    """`validate` checks the checkpoint against the manifest from the digests of the reference's
    own reads, after comparing: the checkpoint is read once, not once to hash and once to run."""
    from mixexport.checkpoint import reader

    path = tmp_path_factory.mktemp("hf") / "checkpoint"
    write_hf_checkpoint(path, hidden=64, intermediate=96)
    with reference_source(path, None, 0, {}, lambda _: None) as (ckpt, source):
        out = tmp_path_factory.mktemp("once") / "out"
        build(ckpt, source, out, BuildOptions(targets=("ort",), validate=False, **RANGES), lambda _: None)
    reads = []
    read_tensor = reader.read_tensor
    monkeypatch.setattr(reader, "read_tensor", lambda info, out=None: reads.append(info) or read_tensor(info, out))
    report, _ = validate_out(out, mode="streamed")
    assert report["passed"]
    tensors = Checkpoint(path).tensors
    assert len(reads) == len(set(reads)) == len(tensors), "a checkpoint tensor was read twice (or not at all)"


def test_a_stage_graph_that_cannot_be_built_fails_its_target_not_validation(tmp_path_factory, monkeypatch):
    """Stage graphs are built before their reference runs (their weights are hashed meanwhile);
    one that cannot be built fails as a session that cannot load: that stage fails, the rest
    are compared."""
    from mixexport.validate import streamed

    out, _, _ = unvalidated_build("e4-k2-float32", ("ort",), tmp_path_factory)
    build_stage = streamed._stage_model_bytes

    def broken(graph, stage, config):
        if stage.first == 0 and stage.end == 1:
            def fail() -> bytes:
                raise ValueError("no such stage")
            return fail
        return build_stage(graph, stage, config)
    monkeypatch.setattr(streamed, "_stage_model_bytes", broken)
    report, _ = validate_out(out, mode="streamed")
    ort = report["targets"]["ort"]
    assert ort["status"] == "fail" and ort["failed_stages"] == ["layers.0-0"]
    assert ort["reason"] == "layers.0-0: could not run: ValueError: no such stage"
