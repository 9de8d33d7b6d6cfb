"""Damaged artifacts: validate refuses changed files, and a real numerical mismatch fails parity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from artifact.shared import error_line, forced_unvalidated_ort_build, run_cli
from mixexport.artifact.manifest import file_entry
from mixexport.validate.parity import REPORT_FILE


def corrupt_moe_weights(out, layer=0):
    """Scale layer `layer`'s gate/up weights of every expert (the ort graph for CPU holds one
    initializer per expert) in OUT/ort/model.onnx.data by -3, found via their external-data entries."""
    model = onnx.load(str(out / "ort" / "model.onnx"), load_external_data=False)
    tensors = [t for t in model.graph.initializer
               if t.name.startswith(f"layers.{layer}.moe.experts.") and t.name.endswith(".w_gate_up_t")]
    assert tensors
    path = out / "ort" / "model.onnx.data"
    data = bytearray(path.read_bytes())
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        assert tensor.data_type == onnx.TensorProto.FLOAT and length == 4 * int(np.prod(tensor.dims))
        assert info["location"] == path.name
        region = np.frombuffer(bytes(data[offset:offset + length]), np.float32) * -3.0
        data[offset:offset + length] = region.astype(np.float32).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["whole", "streamed"])
def test_validate_refuses_changed_files(mode, tmp_path_factory, tmp_path):
    """Whole-model validation hashes the files before it compares, streamed validation each weight
    file as its stages load it: either way a changed file fails, and no report is written."""
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    assert run_cli("validate", copy, "--validation-mode", mode).exit_code == 0  # intact copy passes
    (copy / REPORT_FILE).unlink()
    corrupt_moe_weights(copy)
    line = error_line(run_cli("validate", copy, "--validation-mode", mode))
    assert line == (f"error: target ort: {copy / 'ort' / 'model.onnx.data'} has changed since the build "
                    f"(size or sha256 differ)")
    assert not (copy / REPORT_FILE).exists()


def test_corrupted_weight_fails_parity(tmp_path_factory, tmp_path):
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    copy = shutil.copytree(out, tmp_path / "out")
    corrupt_moe_weights(copy)
    # Re-record the hashes so validation gets past the file check to the numerics.
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["targets"]["ort"]["files"] = [file_entry(copy / f["path"], copy)
                                           for f in manifest["targets"]["ort"]["files"]]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("validate", copy)
    assert error_line(result) == "error: parity failed for ort (tolerances float32: see the report)"
    report = json.loads((copy / REPORT_FILE).read_text())
    assert report["passed"] is False and report["summary"]["failed_targets"] == ["ort"]
    ort_report = report["targets"]["ort"]
    assert ort_report["status"] == "fail"
    assert "logits" in ort_report["failed_outputs"]
    assert ort_report["max_abs_diff"]["logits"] > report["tolerances"]["logits"]["atol"]
