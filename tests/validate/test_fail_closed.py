"""`validate` fails closed: what it checks comes from the artifact's files, any disagreement with the
manifest fails, a target it cannot run is "not validated" (not a pass), comparing nothing is not a
pass, and it works on a read-only artifact without writing into it or reading outside it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import onnx
import pytest

from artifact.shared import (built, edit_manifest, error_line, forced_unvalidated_ort_build, run_cli,
                             unvalidated_build)
from mixexport.artifact.manifest import MANIFEST, file_entry
from mixexport.targets.trt.backend import TrtBackend
from mixexport.validate.parity import REPORT_FILE

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def ort_only(tmp_path_factory, tmp_path) -> Path:
    """A private copy of a valid float32 artifact holding only the ort target."""
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    return Path(shutil.copytree(out, tmp_path / "out"))


@pytest.fixture
def three_targets(tmp_path_factory, tmp_path) -> Path:
    """A private copy of a valid float16 artifact with portable, ort and trt."""
    out, _, _ = built("e4-k1-float16", tmp_path_factory)
    return Path(shutil.copytree(out, tmp_path / "out"))


def _rehash(out: Path, target: str) -> None:
    """Re-record a target's file hashes, as someone who edited the files on purpose would."""
    edit_manifest(out, lambda m: m["targets"][target].update(
        files=[file_entry(out / f["path"], out) for f in m["targets"][target]["files"]]))


def test_intact_copies_pass(ort_only):
    result = run_cli("validate", ort_only)
    assert result.exit_code == 0, result.output
    report = json.loads((ort_only / REPORT_FILE).read_text())
    assert report["summary"] == {"passed": True, "targets": {"ort": "pass"}, "failed_targets": [],
                                 "router_agreement": {"ort": 1.0}, "not_validated": [], "compared": 1,
                                 "mode": "whole"}


def test_one_flipped_byte_in_the_weights_fails(ort_only):
    data = ort_only / "ort" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: target ort: {data} has changed since the build (size or sha256 differ)")


def test_target_removed_from_the_manifest_fails(three_targets):
    path = edit_manifest(three_targets, lambda m: (m["targets"].pop("ort"), m.pop("validation")))
    assert error_line(run_cli("validate", three_targets)) == (
        f"error: {three_targets / 'ort'} is a target directory that {path} does not list in targets")


def test_targets_emptied_fails(ort_only):
    path = edit_manifest(ort_only, lambda m: m.update(targets={}))
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {ort_only / 'ort'} is a target directory that {path} does not list in targets")


def test_manifest_target_without_its_directory_fails(three_targets):
    shutil.rmtree(three_targets / "portable")
    assert error_line(run_cli("validate", three_targets)) == (
        f"error: {three_targets / MANIFEST}: targets.portable.onnx: {three_targets / 'portable' / 'model.onnx'} is "
        f"missing")


def test_files_list_dropped_fails(ort_only):
    path = edit_manifest(ort_only, lambda m: m["targets"]["ort"].update(files=[]))
    line = error_line(run_cli("validate", ort_only))
    # (the first file by name: the runtime files sort before the graph)
    assert line == (f"error: {ort_only / 'ort' / 'config.json'} is not listed in {path} (targets.ort): an artifact "
                    f"holds only the files its manifest records")


def test_files_list_missing_a_file_fails(ort_only):
    path = edit_manifest(ort_only, lambda m: m["targets"]["ort"].update(
        files=[f for f in m["targets"]["ort"]["files"] if f["path"] != "ort/model.onnx.data"]))
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {ort_only / 'ort' / 'model.onnx.data'} is not listed in {path} (targets.ort): an artifact holds "
        f"only the files its manifest records")


def test_unlisted_file_in_a_target_dir_fails(ort_only):
    (ort_only / "ort" / "extra.onnx").write_bytes(b"x")
    assert "extra.onnx is not listed in" in error_line(run_cli("validate", ort_only))


def test_unknown_directory_in_out_fails(ort_only):
    (ort_only / "ORT").mkdir()
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {ort_only / 'ORT'} is a directory but not a target (portable, ort, trt): an artifact holds only "
        f"its targets")


def test_onnx_pointing_at_another_targets_graph_fails(three_targets):
    path = edit_manifest(three_targets, lambda m: m["targets"]["ort"].update(onnx="portable/model.onnx"))
    assert error_line(run_cli("validate", three_targets)) == (
        f"error: {path}: targets.ort.onnx is 'portable/model.onnx'; the ort graph is 'ort/model.onnx'")


def test_files_of_another_target_listed_fails(three_targets):
    path = edit_manifest(three_targets, lambda m: m["targets"]["ort"]["files"].append(m["targets"]["portable"]["files"][0]))
    last = len(json.loads(path.read_text())["targets"]["ort"]["files"]) - 1
    assert error_line(run_cli("validate", three_targets)) == (
        f"error: {path}: targets.ort.files[{last}].path is 'portable/model.onnx', outside ort/")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_manifest_dtype_differing_from_the_graph_fails(ort_only, dtype):
    """float16 would loosen the tolerance, bfloat16 would skip every target: the graph's own dtype rules."""
    path = edit_manifest(ort_only, lambda m: m.update(dtype=dtype))
    graph = ort_only / "ort" / "model.onnx"
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {path}: dtype is {dtype!r} but {graph} is a float32 graph")
    path = edit_manifest(ort_only, lambda m: (m.update(dtype="float32"), m["targets"]["ort"].update(dtype=dtype)))
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {path}: targets.ort.dtype is {dtype!r} but {graph} is a float32 graph")


def test_external_data_outside_the_target_is_refused(three_targets, tmp_path):
    """A graph (re-hashed) whose weights point at another target's file or outside OUT."""
    graph = three_targets / "ort" / "model.onnx"
    for location in ("../portable/model.onnx.data", str(tmp_path / "elsewhere.data")):
        model = onnx.load(str(graph), load_external_data=False)
        tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        next(e for e in tensor.external_data if e.key == "location").value = location
        onnx.save(model, str(graph))
        _rehash(three_targets, "ort")
        assert error_line(run_cli("validate", three_targets)) == (
            f"error: {graph}: tensor {tensor.name!r} keeps its data in {location!r}, which is not one of the ort "
            f"files {three_targets / MANIFEST} lists")


def test_not_onnx_graph_is_one_line(ort_only):
    (ort_only / "ort" / "model.onnx").write_bytes(b"\xff" * 64)
    _rehash(ort_only, "ort")
    assert error_line(run_cli("validate", ort_only)).startswith(
        f"error: {ort_only / 'ort' / 'model.onnx'} is not a readable ONNX model")


def test_symlink_out_of_a_target_dir_is_refused(ort_only, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    (ort_only / "ort" / "link.bin").symlink_to(outside)
    assert "leads outside" in error_line(run_cli("validate", ort_only))


def test_fifo_in_a_target_dir_is_refused_without_hanging(ort_only):
    os.mkfifo(ort_only / "ort" / "pipe")
    run = subprocess.run([sys.executable, "-m", "mixexport.cli.main", "validate", str(ort_only)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"error: {ort_only / 'ort' / 'pipe'} is not a regular file" in run.stderr


def test_no_target_at_all_compared_nothing(ort_only):
    shutil.rmtree(ort_only / "ort")
    edit_manifest(ort_only, lambda m: m.update(targets={}))
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {ort_only}: compared nothing: the artifact holds no target; a gate that compared nothing has not "
        f"passed")
    assert json.loads((ort_only / REPORT_FILE).read_text())["summary"]["compared"] == 0


def test_float32_trt_graph_fails(tmp_path_factory, tmp_path):
    """The CPU stand-in of the plugin would pass it; no engine could run it. Build refuses such a
    graph up front, so it stands for an artifact an older mixexport wrote."""
    with mock.patch.object(TrtBackend, "refusal", lambda self, config, dtype: None), \
            mock.patch.object(TrtBackend, "finish", lambda self, *args, **kwargs: None):  # no fp32 kernels to compile
        out, _, _ = unvalidated_build("e4-k2-float32", ("trt",), tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    result = run_cli("validate", copy)
    assert error_line(result) == "error: parity failed for trt (tolerances float32: see the report)"
    assert "the MixtralMoE plugin has no float32 kernels" in result.stdout
    trt = json.loads((copy / REPORT_FILE).read_text())["targets"]["trt"]
    assert trt == {"status": "fail", "reason": "the MixtralMoE plugin has no float32 kernels (their tiles do not fit "
                                               "in shared memory); it supports float16, bfloat16: no trt runtime can "
                                               "run this graph"}


@pytest.fixture(scope="module")
def bf16_artifact(tmp_path_factory):
    out, _, _ = unvalidated_build("e4-k2-float32", ("portable", "trt"), tmp_path_factory, dtype="bfloat16")
    return out


def test_bfloat16_targets_are_not_validated_and_not_passed(bf16_artifact, tmp_path):
    copy = shutil.copytree(bf16_artifact, tmp_path / "out")
    for flags in ((), ("--allow-not-validated",)):  # nothing compared: not a pass either way
        result = run_cli("validate", copy, *flags)
        assert error_line(result) == (
            f"error: {copy}: compared nothing: no target could be run here (not validated: portable, trt); a gate "
            f"that compared nothing has not passed")
        rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:3]}
        assert "not validated" in rows["portable"] and "do not run bfloat16 graphs" in rows["portable"]
    summary = json.loads((copy / REPORT_FILE).read_text())["summary"]
    assert summary == {"passed": False, "targets": {"portable": "not validated", "trt": "not validated"},
                       "failed_targets": [], "router_agreement": {"portable": None, "trt": None},
                       "not_validated": ["portable", "trt"], "compared": 0}


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the engine would be run, not reported unvalidated")
def test_engine_without_tensorrt_is_not_validated_unless_allowed(three_targets):
    """An artifact whose engine was built on a GPU machine, validated where TensorRT is missing."""
    from mixexport.targets.trt.engine import PLUGIN_LIBRARY

    folder = three_targets / "trt"
    (folder / "model.engine").write_bytes(b"engine bytes from a GPU machine")
    (folder / PLUGIN_LIBRARY).write_bytes(b"plugin library")
    edit_manifest(three_targets, lambda m: m["targets"]["trt"].update(engine={
        "file": "trt/model.engine", "files": [file_entry(folder / n, three_targets)
                                              for n in ("model.engine", PLUGIN_LIBRARY)],
        "tensorrt": "10.9", "gpu": "H100", "profiles": [], "plugin": PLUGIN_LIBRARY}))
    result = run_cli("validate", three_targets)
    assert error_line(result) == ("error: not validated here: trt-engine (see the table); pass --allow-not-validated "
                                  "to accept the targets that passed")
    engine_row = next(line for line in result.stdout.splitlines() if line.startswith("trt-engine"))
    assert "not validated" in engine_row and "TensorRT" in engine_row
    summary = json.loads((three_targets / REPORT_FILE).read_text())["summary"]
    assert summary["passed"] is False and summary["not_validated"] == ["trt-engine"] and summary["compared"] == 3
    allowed = run_cli("validate", three_targets, "--allow-not-validated")
    assert allowed.exit_code == 0, allowed.output


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_available() and os.geteuid() == 0,
                    reason="needs a read-only mount (unshare -rm) to make a directory read-only for root")
def test_read_only_artifact_validates(ort_only, tmp_path):
    """Nothing is written into OUT (no scratch graph, no report); the report goes to --report."""
    report = tmp_path / "report.json"
    before = sorted(p.relative_to(ort_only) for p in ort_only.rglob("*"))
    command = [sys.executable, "-m", "mixexport.cli.main", "validate", str(ort_only), "--report", str(report)]
    if _unshare_available():  # a read-only bind mount of OUT in a private mount namespace
        script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && '
                  'touch "$0/probe" 2>/dev/null && exit 99; exec "$@"')
        command = ["unshare", "-rm", "sh", "-c", script, str(ort_only), *command]
    else:
        for path in [ort_only, *ort_only.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{ort_only} is not writable: the report is not written there" in run.stderr
    assert f"report: {report}" in run.stdout
    assert json.loads(report.read_text())["passed"] is True
    assert sorted(p.relative_to(ort_only) for p in ort_only.rglob("*")) == before


def test_validate_artifact_checks_the_manifest_it_is_given(three_targets, tiny_checkpoint):
    """build passes its in-memory manifest: the same cross-check applies (no read_manifest on the way)."""
    from mixexport.artifact.manifest import read_manifest
    from mixexport.checkpoint.reader import Checkpoint
    from mixexport.errors import MixexportError
    from mixexport.validate.parity import validate_artifact

    manifest = read_manifest(three_targets)
    shutil.rmtree(three_targets / "portable")
    with pytest.raises(MixexportError) as err:
        validate_artifact(three_targets, manifest, Checkpoint(tiny_checkpoint), progress=lambda _: None)
    assert str(err.value) == (f"{three_targets / MANIFEST}: targets.portable has no directory "
                              f"{three_targets / 'portable'}")


def test_preset_source_larger_than_the_artifact_is_refused_before_regenerating(ort_only):
    """A manifest whose source.config is Mixtral 8x7B would make validate write and load 93 GB."""
    from mixexport.checkpoint.config import preset
    from mixexport.checkpoint.names import weight_count

    big = preset("mixtral-8x7b")
    path = edit_manifest(ort_only, lambda m: (m["source"].update(config=big.to_hf_dict()), m.update(model=big.summary())))
    held = sum(f.stat().st_size for f in (ort_only / "ort").iterdir())
    needed = weight_count(preset("mixtral-8x7b")) * 4
    assert needed > 180e9  # 46.7B parameters in float32
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {path}: source.config describes {needed} bytes of float32 weights, but the largest target "
        f"holds {held} bytes: the source does not describe this artifact")


def test_weight_count_matches_a_real_artifact(tmp_path_factory):
    from mixexport.checkpoint.config import MixtralConfig
    from mixexport.checkpoint.names import weight_count

    out, manifest, _ = built("e4-k1-float16", tmp_path_factory)
    config = MixtralConfig.from_hf_dict(manifest.source["config"])
    held = sum(f["bytes"] for f in manifest.targets["portable"].files)  # small tensors live in model.onnx
    data = (out / "portable" / "model.onnx.data").stat().st_size
    assert data <= weight_count(config) * 2 <= held


def test_checkpoint_source_path_must_be_absolute(ort_only):
    path = edit_manifest(ort_only, lambda m: m.update(source={"kind": "checkpoint", "path": "relative/ckpt", "files": []}))
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {path}: source.path 'relative/ckpt' must be an absolute path without NUL bytes")


@pytest.mark.parametrize("change, message", [
    (lambda e: e["inputs"][1].update(shape=["batch", 1]),
     "targets.ort.inputs differ from {graph}'s at [1] (graph: {{'name': 'attention_mask', 'dtype': 'int64', "
     "'shape': ['batch', 'total_sequence']}})"),
    (lambda e: e["outputs"].pop(), "targets.ort.outputs differ from {graph}'s at [4] (graph: {{'name': "
                                   "'present.1.value', 'dtype': 'float32', 'shape': ['batch', 2, 'total_sequence', 16]}})"),
    # the ort graph for onnxruntime's CPU provider (the default) holds the sparse form, no fused node
    (lambda e: e.update(moe_op="trt.plugins.MixtralMoE"),
     "targets.ort: moe_op 'trt.plugins.MixtralMoE' x 2 but {graph} holds no MoE node"),
    (lambda e: e.update(moe_op="com.microsoft.MoE"),
     "targets.ort: moe_op 'com.microsoft.MoE' x 2 but {graph} holds no MoE node"),
])
def test_manifest_account_of_the_graph_must_be_the_graph(ort_only, change, message):
    """Bindings (what runtimes and the TensorRT profiles read) and the MoE op, as the graph has them."""
    path = edit_manifest(ort_only, lambda m: change(m["targets"]["ort"]))
    graph = ort_only / "ort" / "model.onnx"
    assert error_line(run_cli("validate", ort_only)) == f"error: {path}: " + message.format(graph=graph)


def test_model_differing_from_the_reference_config_fails(ort_only):
    path = edit_manifest(ort_only, lambda m: m["model"].update(num_key_value_heads=4))
    assert error_line(run_cli("validate", ort_only)) == (
        f"error: {path}: source.config: num_key_value_heads is 2 but the artifact's manifest records "
        f"model.num_key_value_heads = 4: not the model this artifact was exported from")


def test_validation_summary_naming_a_removed_target_fails(three_targets):
    path = edit_manifest(three_targets, lambda m: m["targets"].pop("ort"))
    assert error_line(run_cli("validate", three_targets)) == (
        f"error: {path}: validation.targets names ort, which the artifact does not hold")
