"""Quantized experts end to end: tiny-preset int8 / int4 builds on portable and ort validate with
both checks (exactness against the dequantized reference, quantization error against the full
one); a lowering that lays the bytes out wrong fails the first; the gates and refusals hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from artifact.shared import RANGES, SEED, edit_manifest, error_line, rewrite_initializer, run_cli
from mixexport.artifact.inspect import inspect_path
from mixexport.artifact.manifest import read_manifest
from mixexport.driver.build import BuildOptions, build, reference_source
from mixexport.errors import MixexportError
from mixexport.passes import quant_weights
from mixexport.quant import QuantScheme, parse_scheme, quantize
from mixexport.validate.parity import validate_artifact
from mixexport.validate.quant_parity import QuantThresholds, quantization_error

TARGETS = ("portable", "ort", "trt")


def targets_of(dtype: str) -> tuple[str, ...]:
    """The targets a tiny build in `dtype` holds (trt has no float32 kernels)."""
    return TARGETS if dtype == "float16" else ("portable", "ort")
_builds: dict = {}


def quant_build(tmp_path_factory, scheme: QuantScheme, dtype: str = "float32"):
    """(OUT, manifest) of the tiny preset with `scheme` experts, built and validated once."""
    key = (scheme, dtype)
    if key not in _builds:
        out = tmp_path_factory.mktemp(f"quant-{scheme.name}-{dtype}") / "out"
        with reference_source(None, "tiny", SEED, {"dtype": dtype}, lambda _: None) as (ckpt, source):
            manifest = build(ckpt, source, out, BuildOptions(targets=targets_of(dtype), experts_quant=scheme, **RANGES),
                             lambda _: None)
        _builds[key] = (out, manifest)
    return _builds[key]


@pytest.mark.parametrize("scheme, dtype", [(QuantScheme(8), "float32"), (QuantScheme(4, 32), "float32"),
                                           (QuantScheme(8), "float16"), (QuantScheme(4, 32), "float16")])
def test_quantized_build_validates(tmp_path_factory, scheme, dtype):
    out, manifest = quant_build(tmp_path_factory, scheme, dtype)
    assert manifest.experts_quant == scheme.to_json() == read_manifest(out).experts_quant
    assert manifest.targets["ort"].moe_op == "com.microsoft.QMoE"
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["experts_quant"]["scheme"] == scheme.name
    for target in targets_of(dtype):
        result = report["targets"][target]
        assert result["status"] == "pass" and result["router_agreement"] == 1.0  # (a): exact lowering
        quant = result["quantization"]  # (b): against the full-precision reference
        assert quant["passed"] and quant["positions"] == 19
        assert 0 < quant["logits_rel_error"] <= quant["thresholds"]["max_logits_rel_error"]
    info = inspect_path(out)
    assert info["experts_quant"] == scheme.to_json()
    assert info["targets"]["ort"]["ops"]["com.microsoft.QMoE"] == 2 and info["targets"]["ort"]["moe_nodes"] == 2


def test_inspect_cli_names_the_scheme(tmp_path_factory):
    out, _ = quant_build(tmp_path_factory, QuantScheme(4, 32))
    result = run_cli("inspect", out)
    assert result.exit_code == 0
    assert "experts: int4 weight-only, group 32 (uint8, zero point 2**(bits-1), two per byte, low nibble first)" \
        in result.output


def _swapped_nibbles(weight, scheme, scale_dtype):
    stored, scale = quantize(weight, scheme, scale_dtype)
    return (stored >> 4) | ((stored & 0xF) << 4), scale


@pytest.mark.parametrize("target, dtype", [("portable", "float32"), ("ort", "float32"), ("trt", "float16")])
def test_wrong_nibble_order_fails_exactness(tmp_path, monkeypatch, target, dtype):
    monkeypatch.setattr(quant_weights, "quantize", _swapped_nibbles)  # the lowering's bytes only
    out = tmp_path / "out"
    with reference_source(None, "tiny", SEED, {"dtype": dtype}, lambda _: None) as (ckpt, source):
        with pytest.raises(MixexportError, match=r"parity validation failed \(\['" + target + r"'\]\)"):
            build(ckpt, source, out, BuildOptions(targets=(target,), experts_quant=QuantScheme(4, 32), **RANGES),
                  lambda _: None)
    report = json.loads(next(tmp_path.glob("out.failed*")).joinpath("validation.json").read_text())
    assert report["targets"][target]["failed_outputs"]  # outside the tight tolerance of (a)


@pytest.mark.parametrize("mode", ["whole", "streamed"])
def test_quantization_gate_fails_closed(tmp_path_factory, tmp_path, mode):
    out, manifest = quant_build(tmp_path_factory, QuantScheme(4, 32))
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    with reference_source(None, "tiny", SEED, {}, lambda _: None) as (ckpt, _):
        report = validate_artifact(copy, read_manifest(copy), ckpt, lambda _: None, mode=mode,
                                   quant_thresholds=QuantThresholds(max_logits_rel_error=0.0))
    assert not report["passed"] and report["mode"] == mode
    for target in targets_of("float32"):
        assert report["targets"][target]["status"] == "fail"
        assert report["targets"][target]["quantization"]["failed"] == ["max_logits_rel_error"]


def test_quantization_error_counts_real_positions_only():
    import numpy as np

    mask = np.array([[0, 1, 1]])
    feed = {"input_ids": np.zeros((1, 3), np.int64), "attention_mask": mask}
    ref = {"logits": np.array([[[9.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])}
    out = {"logits": np.array([[[0.0, 9.0], [1.0, 0.0], [1.0, 0.0]]])}  # the padded position disagrees too
    thresholds = QuantThresholds().resolve(QuantScheme(8))
    result = quantization_error([ref], [out], [feed], None, thresholds)
    assert result["positions"] == 2 and result["top1_agreement"] == 0.5
    assert result["failed"] == ["min_top1", "max_logits_rel_error"]
    nan = {"logits": np.full((1, 3, 2), np.nan)}
    assert not quantization_error([ref], [nan], [feed], 1.0, thresholds)["passed"]


@pytest.mark.parametrize("args, message", [
    (("--experts-quant", "int4", "--group-size", "64"),
     "error: --experts-quant: int4-g64 needs intermediate_size (96) to be a multiple of the group size 64"),
    (("--experts-quant", "int8", "--group-size", "32"),
     "error: experts quantization: int8 is per output channel; a group size applies to int4"),
    (("--group-size", "32"), "error: --group-size applies to --experts-quant int4"),
    (("--experts-quant", "int4", "--quant-min-top1", "1.5"),
     "error: quantization threshold min_top1 is a share: between 0 and 1, not 1.5"),
])
def test_refusals(tmp_path, args, message):
    assert error_line(run_cli("build", "--preset", "tiny", "-o", tmp_path / "out", *args)) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("record, why", [
    ({"bits": 5, "group_size": None, "symmetric": True, "storage": "uint8"},
     "experts quantization: bits must be one of (8, 4), not 5"),
    ({"bits": 4, "group_size": 32, "symmetric": False, "storage": "uint8"}, "must be "),
])
def test_manifest_scheme_checked(tmp_path_factory, tmp_path, record, why):
    out, _ = quant_build(tmp_path_factory, QuantScheme(8))
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    path = edit_manifest(copy, lambda m: m.__setitem__("experts_quant", record))
    with pytest.raises(MixexportError) as err:
        read_manifest(copy)
    assert str(err.value).startswith(f"{path}: experts_quant {why}")


def test_parse_scheme_default_group():
    assert parse_scheme("int4") == QuantScheme(4, 32) and parse_scheme("none") is None


def test_validate_cli_reports_and_gates(tmp_path_factory, tmp_path):
    out, _ = quant_build(tmp_path_factory, QuantScheme(8))
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    passed = run_cli("validate", copy)
    assert passed.exit_code == 0, passed.output
    assert "quantization error (int8 experts, against the full-precision reference" in passed.output
    line = error_line(run_cli("validate", copy, "--quant-min-top1", "1", "--quant-max-logits-error", "0"))
    assert line == "error: parity failed for portable, ort (tolerances float32: see the report)"
    report = json.loads((copy / "validation.json").read_text())
    assert report["targets"]["ort"]["quantization"]["failed"] == ["max_logits_rel_error"]


@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(4, 32)])
def test_size_estimate_counts_quantized_experts(tmp_path_factory, scheme):
    from mixexport.checkpoint.config import preset
    from mixexport.driver.build import weight_bytes

    out, manifest = quant_build(tmp_path_factory, scheme)
    written = next(f["bytes"] for f in manifest.targets["ort"].files if f["path"].endswith(".data"))
    with reference_source(None, "tiny", SEED, {}, lambda _: None) as (ckpt, _):
        estimate = weight_bytes(ckpt, "float32", scheme)
        assert estimate < weight_bytes(ckpt, "float32")
    assert written <= estimate <= written * 1.01

    class Mixtral8x7B:
        config = preset("mixtral-8x7b")
    # experts 45.1e9 weights: int4 at half a byte, plus fp16 scales per 32 columns; the rest stays fp16
    assert round(weight_bytes(Mixtral8x7B, "float16", QuantScheme(4, 32)) / 1e9, 1) == 28.6


@pytest.mark.parametrize("scheme, dtype", [(QuantScheme(8), "float32"), (QuantScheme(4, 32), "float32"),
                                           (QuantScheme(8), "float16"), (QuantScheme(4, 32), "float16")])
def test_streamed_validation_of_quantized_experts_agrees_with_whole(tmp_path_factory, scheme, dtype):
    out, _ = quant_build(tmp_path_factory, scheme, dtype)
    with reference_source(None, "tiny", SEED, {"dtype": dtype}, lambda _: None) as (ckpt, _):
        whole, streamed = (validate_artifact(out, read_manifest(out), ckpt, lambda _: None, mode=mode,
                                             write_report=False) for mode in ("whole", "streamed"))
    assert whole["passed"] and streamed["passed"] and streamed["summary"]["mode"] == "streamed"
    assert streamed["summary"]["compared"] == len(targets_of(dtype))
    for target in targets_of(dtype):
        by_whole, by_stage = whole["targets"][target], streamed["targets"][target]
        assert by_stage["status"] == by_whole["status"] == "pass"
        assert by_stage["router_agreement"] == 1.0  # (a) per stage: the dequantized reference, exactly
        quant, whole_quant = by_stage["quantization"], by_whole["quantization"]  # (b) over the target's chain
        assert quant["passed"] and quant["thresholds"] == whole_quant["thresholds"]
        assert quant["positions"] == whole_quant["positions"] == 19
        # Other decode tokens (seeded, not greedy), the same error: within a quarter of each other.
        assert abs(quant["logits_rel_error"] - whole_quant["logits_rel_error"]) <= 0.25 * whole_quant["logits_rel_error"]


@pytest.mark.parametrize("target, layer", [("ort", 0), ("ort", 1), ("portable", 0), ("portable", 1)])
def test_a_swapped_nibble_layer_fails_streamed_validation_naming_it(tmp_path_factory, tmp_path, target, layer):
    out, _ = quant_build(tmp_path_factory, QuantScheme(4, 32))
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    model = onnx.load(str(copy / target / "model.onnx"), load_external_data=False)
    # ort's QMoE stores the packed bytes as uint8, portable's DequantizeLinear as uint4 (same bytes;
    # its zero points are uint4 too, but small enough to be stored in the graph).
    packed = (onnx.TensorProto.UINT8, onnx.TensorProto.UINT4)
    (name,) = [t.name for t in model.graph.initializer
               if t.name.startswith(f"layers.{layer}.moe.") and t.data_type in packed
               and t.data_location == onnx.TensorProto.EXTERNAL][:1]

    def swap(data):
        stored = np.frombuffer(data, np.uint8)
        return ((stored >> 4) | ((stored & 0xF) << 4)).astype(np.uint8).tobytes()
    rewrite_initializer(copy, target, name, swap)
    with reference_source(None, "tiny", SEED, {}, lambda _: None) as (ckpt, _):
        report = validate_artifact(copy, read_manifest(copy), ckpt, lambda _: None, mode="streamed", write_report=False)
    assert not report["passed"]
    result = report["targets"][target]
    # Teacher forcing of the exactness check: the broken layer's stage fails, and it alone.
    assert result["status"] == "fail" and result["failed_stages"] == [f"layers.{layer}-{layer}"]
    assert f"hidden_states.{layer + 1}" in result["failed_outputs"]
    assert all(r["status"] == "pass" for t, r in report["targets"].items() if t != target)
