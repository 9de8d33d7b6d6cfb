"""CLI behaviour: one-line errors with exit 1, inspect output, --force, the `.failed` directory."""

from __future__ import annotations

import json
import shutil

import pytest

from artifact.shared import (RANGES, SEED, STALE_MARKER, built, error_line, forced_unvalidated_ort_build, overrides,
                             run_cli, targets_of)
from mixexport.driver.build import BuildOptions, build, reference_source
from mixexport.errors import MixexportError


def test_unsupported_config_refused(tiny_checkpoint, checkpoint_copy, tmp_path):
    ckpt = checkpoint_copy(tiny_checkpoint)
    config = json.loads((ckpt / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (ckpt / "config.json").write_text(json.dumps(config))
    line = error_line(run_cli("build", ckpt, "-o", tmp_path / "out"))
    assert line == (f"error: {ckpt / 'config.json'}: hidden_act='gelu' is not supported: Mixtral experts use SiLU; "
                    f"other activations are not implemented")
    assert not (tmp_path / "out").exists()


def test_existing_out_without_force_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    line = error_line(run_cli("build", "--preset", "tiny", "-o", out))
    assert line == f"error: {out} already exists; pass --force to replace it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bfloat16_for_ort_refused(tmp_path):
    line = error_line(run_cli("build", "--preset", "tiny", "--dtype", "bfloat16", "--target", "ort",
                              "-o", tmp_path / "out"))
    assert line == ("error: target ort cannot be built for bfloat16: onnxruntime's MoE kernels have no bfloat16; "
                    "it supports float32, float16")
    assert list(tmp_path.iterdir()) == []


def test_validate_preset_build_refuses_checkpoint_option(tmp_path_factory, tmp_path):
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    line = error_line(run_cli("validate", out, "--checkpoint", tmp_path))
    assert line == (f"error: {out} was built from preset 'tiny' (seed {SEED}); its reference is regenerated, "
                    f"--checkpoint does not apply")


def test_validate_good_artifact_passes(tmp_path_factory, tmp_path):
    out, _, _ = built("e4-k1-float16", tmp_path_factory)
    report = tmp_path / "report.json"
    result = run_cli("validate", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["passed"] is True
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:3]}
    assert rows == {"portable": "pass", "ort": "pass"}


@pytest.mark.parametrize("name", ["e4-k2-float16", "e4-k1-float16"])
def test_inspect_artifact(name, tmp_path_factory):
    out, manifest, _ = built(name, tmp_path_factory)
    result = run_cli("inspect", out)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"dtype {manifest.dtype}" in text and "validation: passed" in text
    for target in targets_of(name):
        header = [line for line in text.splitlines() if line.startswith(f"[{target}]")]
        assert len(header) == 1
        expected = 2 if target == "trt" else 0  # portable and ort for CPU: no MoE op, only standard ops
        assert f", {expected} MoE nodes," in header[0]
    as_json = json.loads(run_cli("inspect", out, "--json").stdout)
    targets = as_json["targets"]
    moe_nodes = {"portable": 0, "ort": 0, "trt": 2}
    assert {t: v["moe_nodes"] for t, v in targets.items()} == {t: moe_nodes[t] for t in targets_of(name)}
    assert "com.microsoft.MoE" not in targets["ort"]["ops"]
    assert "mixexport" not in targets["ort"]["opsets"]
    for target in targets_of(name):
        assert [b["name"] for b in targets[target]["inputs"][:3]] == ["input_ids", "attention_mask", "position_ids"]
    if "trt" in targets:
        assert targets["trt"]["ops"]["trt.plugins.MixtralMoE"] == 2
    assert targets["ort"]["outputs"][0] == {"name": "logits", "dtype": "float32",
                                            "shape": ["batch", "sequence", 256]}
    assert as_json["manifest"]["dtype"] == manifest.dtype and as_json["validation"]["passed"] is True


def test_inspect_onnx_file(tmp_path_factory):
    out, _, _ = built("e4-k1-float16", tmp_path_factory)
    result = run_cli("inspect", out / "trt" / "model.onnx", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)["targets"]["model"]
    assert info["moe_nodes"] == 2 and info["opsets"]["trt.plugins"] == 1


def test_inspect_non_artifact_dir(tmp_path):
    line = error_line(run_cli("inspect", tmp_path))
    assert line == f"error: {tmp_path} has no manifest.json: give a mixexport build directory or a .onnx file"


def test_force_replaces_out_after_success(tmp_path_factory):
    out, manifest = forced_unvalidated_ort_build(tmp_path_factory)
    assert not (out / STALE_MARKER).exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "ort"]
    assert manifest.validation is None
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no .old or .building dirs left


def test_parity_failure_keeps_failed_dir_and_old_out(tmp_path_factory, tmp_path, monkeypatch):
    """A lowering bug (fc1 not interleaved) is caught by validation: OUT stays, OUT.failed is kept."""
    good, _, _ = built("e4-k2-float32", tmp_path_factory)
    out = shutil.copytree(good, tmp_path / "out")
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr("mixexport.targets.ort.lowering.interleave_gate_up", lambda w: w)
    with reference_source(None, "tiny", SEED, overrides("e4-k2-float32"), lambda _: None) as (ckpt, source):
        with pytest.raises(MixexportError) as err:
            build(ckpt, source, out, BuildOptions(targets=("ort",), force=True, ort_provider="cuda", **RANGES),
                  lambda _: None)
    failed = tmp_path / "out.failed"
    assert str(err.value) == (f"parity validation failed (['ort']); the artifact was kept for inspection in "
                              f"{failed}, {out} was not touched")
    assert (out / "manifest.json").read_bytes() == before
    report = json.loads((failed / "validation.json").read_text())
    assert report["targets"]["ort"]["status"] == "fail"
    assert json.loads((failed / "manifest.json").read_text())["validation"]["passed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.failed"]
