"""The shared-buffer KV layout (`--kv-layout shared`, fuse_gqa_ort): the graph it builds, the
parity it passes on the usual scenario, the mask contract its graph enforces, and what is refused.

The decoder has a sliding window (4) shorter than the scenario's sequences (7 to 11 tokens), so
GroupQueryAttention's local_window_size must mean what the reference's window means.
"""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from artifact.shared import error_line, run_cli
from mixexport import graph_io
from mixexport.artifact.manifest import read_manifest
from mixexport.checkpoint.reader import Checkpoint
from mixexport.driver.build import BuildOptions, build, reference_source, resolve_kv_layouts
from mixexport.errors import MixexportError
from mixexport.passes.check_attention_mask import CHECKED_MASK
from mixexport.validate.parity import validate_artifact
from targets.ort.test_fuse_attention import CONFIG, LAYERS

RANGES = dict(max_batch=4, max_sequence=16, max_context=32)


@pytest.fixture(scope="module")
def shared_build(checkpoint_factory, tmp_path_factory):
    """(OUT of a validated ort build with the shared layout, its checkpoint directory)."""
    path = checkpoint_factory(CONFIG)
    out = tmp_path_factory.mktemp("gqa") / "out"
    with reference_source(path, None, 0, {}, lambda _: None) as (ckpt, source):
        build(ckpt, source, out, BuildOptions(targets=("ort",), kv_layout="shared", **RANGES), lambda _: None)
    return out, path


def test_graph_has_one_group_query_attention_per_layer_over_shared_buffers(shared_build):
    out, _ = shared_build
    model = onnx.load(str(out / "ort" / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GroupQueryAttention"] == LAYERS and ops["RotaryEmbedding"] == 2 * LAYERS and ops["Attention"] == 0
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert gqa.name == "layers.0.self_attn.ort/group_query_attention" and gqa.domain == "com.microsoft"
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attributes["local_window_size"] == CONFIG.sliding_window and attributes["do_rotary"] == 0
    assert (attributes["num_heads"], attributes["kv_num_heads"]) == (4, 2)
    assert list(gqa.input[3:7]) == ["past_key_values.0.key", "past_key_values.0.value", "gqa/seqlens_k",
                                    "gqa/total_sequence_length"]
    for value in (model.graph.input[3], model.graph.output[1]):
        assert [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] == \
            ["batch", 2, graph_io.KV_BUFFER, 16]
    manifest = read_manifest(out)
    entry = manifest.targets["ort"]
    assert entry.extra == {graph_io.KV_LAYOUT_FIELD: "shared", "provider": "cpu"}
    assert manifest.dynamic_dims[graph_io.KV_BUFFER] == [1, 32]
    assert entry.inputs[3]["shape"] == ["batch", 2, graph_io.KV_BUFFER, 16]
    assert manifest.validation["passed"] and manifest.validation["targets"] == {"ort": "pass"}


def test_shared_layout_passes_the_scenario_on_real_tokens(shared_build):
    out, path = shared_build
    report = validate_artifact(out, read_manifest(out), Checkpoint(path), lambda _: None, write_report=False)
    result = report["targets"]["ort"]
    assert result["status"] == "pass" and result["router_agreement"] == 1.0
    assert result["max_abs_diff"]["logits"] < 1e-5 and result["max_abs_diff"]["present"] < 1e-5
    assert result["compared"].startswith("real-token positions")


@pytest.mark.parametrize("change", [0, 2])
def test_wrong_seqlens_wiring_fails_parity(shared_build, tmp_path, change):
    """seqlens_k = count - 0 (one slot too far) or count - 2 (the newest token not seen)."""
    out, path = shared_build
    copy = shutil.copytree(out, tmp_path / "out")
    graph = copy / "ort" / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    (one,) = [t for t in model.graph.initializer if t.name == "gqa/one"]
    one.CopyFrom(onnx.numpy_helper.from_array(np.array(change, np.int64), "gqa/one"))
    graph.write_bytes(model.SerializeToString())  # same size: the size check lets it through to parity
    report = validate_artifact(copy, read_manifest(copy), Checkpoint(path), lambda _: None, write_report=False)
    assert report["targets"]["ort"]["status"] == "fail" and not report["passed"]
    assert "logits" in report["targets"]["ort"]["failed_outputs"] or "could not run" in \
        report["targets"]["ort"].get("reason", "")


def _feed(mask: np.ndarray, buffer: int) -> dict[str, np.ndarray]:
    batch, seq = mask.shape
    feed = {"input_ids": np.ones((batch, seq), np.int64), "attention_mask": mask,
            "position_ids": np.tile(np.arange(seq), (batch, 1))}
    for layer in range(LAYERS):
        for name in graph_io.past_names(layer):
            feed[name] = np.zeros((batch, 2, buffer, 16), np.float32)
    return feed


@pytest.fixture(scope="module")
def session(shared_build):
    out, _ = shared_build
    return ort.InferenceSession(str(out / "ort" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_graph_runs_a_right_padded_batch(session):
    mask = np.ones((2, 5), np.int64)
    mask[1, 3:] = 0
    logits = session.run(["logits"], _feed(mask, 8))[0]
    assert logits.shape == (2, 5, CONFIG.vocab_size) and np.isfinite(logits).all()


@pytest.mark.parametrize("why, mask, buffer", [
    ("left padding", np.array([[1, 1, 1, 1], [0, 0, 1, 1]], np.int64), 8),
    ("longer than the buffer", np.ones((2, 4), np.int64), 3),
    ("shorter than the new tokens", np.ones((2, 4), np.int64)[:, :3], 8),
    ("wrong batch", np.ones((1, 4), np.int64), 8),
])
def test_graph_refuses_a_mask_outside_its_contract(session, why, mask, buffer):
    feed = _feed(np.ones((2, 4), np.int64), buffer)
    feed["attention_mask"] = mask
    with pytest.raises(Exception, match=CHECKED_MASK):
        session.run(["logits"], feed)


def test_layout_choice_per_target():
    seen = []
    layouts = resolve_kv_layouts("shared", ("portable", "ort", "trt"), False, CONFIG, seen.append)
    assert {t: kv.name for t, kv in layouts.items()} == {"portable": "concat", "ort": "shared", "trt": "concat"}
    assert layouts["ort"].sliding_window == CONFIG.sliding_window
    assert seen[0].startswith("portable: KV layout concat (the portable target has the concat KV layout only")
    with pytest.raises(MixexportError, match="--kv-layout shared: the portable target has the concat KV layout only"):
        resolve_kv_layouts("shared", ("portable", "ort"), True, CONFIG, seen.append)
    with pytest.raises(MixexportError, match="none of the targets built \\(portable\\) has it; add --target ort"):
        resolve_kv_layouts("shared", ("portable",), False, CONFIG, seen.append)
    with pytest.raises(MixexportError, match="--kv-layout 'paged': choose from concat, shared"):
        resolve_kv_layouts("paged", ("ort",), True, CONFIG, seen.append)


def test_cli_refuses_shared_for_a_named_target_without_it(tmp_path):
    line = error_line(run_cli("build", "--preset", "tiny", "--target", "portable", "--kv-layout", "shared",
                              "-o", tmp_path / "out"))
    assert line.startswith("error: --kv-layout shared: the portable target has the concat KV layout only")
    assert not (tmp_path / "out").exists()


def test_inspect_shows_the_layout(shared_build):
    out, _ = shared_build
    result = run_cli("inspect", out)
    assert result.exit_code == 0 and "KV layout shared" in result.stdout


def test_streamed_validation_reports_the_shared_layout_not_validated(shared_build):
    """Fail closed: the stage graphs of a shared-layout graph are not fed in its contract yet."""
    out, path = shared_build
    report = validate_artifact(out, read_manifest(out), Checkpoint(path), lambda _: None, write_report=False,
                               mode="streamed")
    assert report["targets"]["ort"]["status"] == "not validated"
    assert report["targets"]["ort"]["reason"].startswith("streamed validation of the shared KV layout is not implemented")
    assert not report["passed"] and report["summary"]["compared"] == 0
