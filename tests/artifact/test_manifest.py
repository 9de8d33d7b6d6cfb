"""manifest.json is checked before anything uses it: size, encoding, nesting, types, ranges, fields, and
every path it names (inside OUT, after symlinks, a regular file); writes are atomic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from artifact.shared import edit_manifest, error_line, forced_unvalidated_ort_build, run_cli
from mixexport.artifact.manifest import (FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, read_manifest,
                                         write_json_atomic, write_manifest)
from mixexport.errors import MixexportError


@pytest.fixture
def artifact(tmp_path_factory, tmp_path) -> Path:
    """A private copy of a small valid artifact (ort only, float32)."""
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    return Path(shutil.copytree(out, tmp_path / "out"))


def _refused(out: Path) -> str:
    with pytest.raises(MixexportError) as err:
        read_manifest(out)
    message = str(err.value)
    assert "\n" not in message
    return message


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return change


def _drop(*keys):
    def change(m):
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]
    return change


def test_valid_manifest_reads(artifact):
    manifest = read_manifest(artifact)
    assert manifest.format == FORMAT_VERSION and set(manifest.targets) == {"ort"}
    # the one writer writes back what the one reader read, field for field
    assert manifest.to_json() == json.loads((artifact / MANIFEST).read_text())


def test_write_manifest_refuses_what_the_reader_would(artifact):
    manifest = read_manifest(artifact)
    manifest.targets["ort"].moe_nodes = -1
    before = (artifact / MANIFEST).read_bytes()
    with pytest.raises(MixexportError, match=r"targets\.ort\.moe_nodes must be a non-negative integer"):
        write_manifest(artifact, manifest)
    assert (artifact / MANIFEST).read_bytes() == before


# (change, the error after "OUT/manifest.json: ")
FIELD_CASES = [
    (_set("targets", "ort", "files", 0, "bytes", "12"), "targets.ort.files[0].bytes must be a non-negative integer"),
    (_set("targets", "ort", "files", 0, "bytes", -1), "targets.ort.files[0].bytes must be a non-negative integer"),
    (_set("targets", "ort", "files", 0, "bytes", 1.5), "targets.ort.files[0].bytes must be a non-negative integer"),
    (_set("targets", "ort", "files", 0, "bytes", True), "targets.ort.files[0].bytes must be a non-negative integer"),
    (_set("targets", "ort", "files", 0, "bytes", 10**30), "targets.ort.files[0].bytes must be a non-negative integer"),
    (_set("targets", "ort", "files", 0, "bytes", None), "targets.ort.files[0].bytes must be a non-negative integer"),
    (_set("targets", "ort", "files", 0, "sha256", "xyz"), "targets.ort.files[0].sha256 'xyz' is not of the form "
                                                          "[0-9a-f]{64}"),
    (_set("targets", "ort", "files", {"a": 1}), "targets.ort.files must be a list of 0 to 1000000 items"),
    (_set("targets", "ort", "moe_nodes", "2"), "targets.ort.moe_nodes must be a non-negative integer"),
    (_set("targets", "ort", "dtype", "float64"), "targets.ort.dtype must be one of float32, float16, bfloat16 "
                                                 "(found 'float64')"),
    (_set("dtype", 16), "dtype must be a string of at most 4096 characters"),
    (_drop("targets", "ort", "onnx"), "targets.ort.onnx is missing"),
    (_drop("targets"), "targets is missing"),
    (_drop("source", "seed"), "source.seed is missing"),
    (_set("targets", "ort", "extra", 1), "targets.ort.extra is not a known field"),
    (_set("surprise", {}), "surprise is not a known field"),
    (_set("targets", "ort", "kernels", {}), "targets.ort.kernels is not a known field"),
    (_set("targets", "gpu", {}), "targets key must be one of portable, ort, trt (found 'gpu')"),
    (_set("targets", []), "targets must be a JSON object"),
    (_set("source", {"kind": "pickle"}), "source is none of the kinds of record expected here"),
    (_set("dynamic_dims", "batch", [4, 1]), "dynamic_dims.batch is [4, 1]: the minimum exceeds the maximum"),
    (_set("dynamic_dims", "batch", [1]), "dynamic_dims.batch must be a list of 2 to 2 items"),
    (_set("model", "num_hidden_layers", 0), "model.num_hidden_layers must be an integer in [1, 9223372036854775807]"),
    (_set("validation", {"passed": True, "targets": {"ort": "skipped"}, "failed_targets": [], "router_agreement": {},
                         "not_validated": [], "compared": 1}),
     "validation.targets.ort must be one of pass, fail, not validated (found 'skipped')"),
    (_set("validation", {"passed": True}), "validation.targets is missing"),
    (_set("validation", {"passed": True, "targets": {"ort": "fail"}, "failed_targets": [], "router_agreement":
                         {"ort": 0.5}, "not_validated": [], "compared": 1}),
     "validation.failed_targets is [], which disagrees with validation.targets (expected ['ort'])"),
    (_set("validation", {"passed": True, "targets": {"ort": "not validated"}, "failed_targets": [],
                         "router_agreement": {"ort": None}, "not_validated": ["ort"], "compared": 0}),
     "validation.passed is True, which disagrees with validation.targets (expected False)"),
    (_set("validation", {"passed": True, "targets": {"ort": "pass", "trt": "pass"}, "failed_targets": [],
                         "router_agreement": {"ort": 1.0, "trt": 1.0}, "not_validated": [], "compared": 2}),
     "validation.targets names trt, which the artifact does not hold"),
    (_set("format", 1), "manifest format 1 is not 2; rebuild with mixexport 0.1.0"),
]


@pytest.mark.parametrize("change, message", FIELD_CASES)
def test_wrong_field_is_named(artifact, change, message):
    path = edit_manifest(artifact, change)
    assert _refused(artifact) == f"{path}: {message}"


@pytest.mark.parametrize("name, why", [
    ("../outside.onnx", "must be a relative path inside the artifact (no '..', not absolute)"),
    ("/etc/hostname", "must be a relative path inside the artifact (no '..', not absolute)"),
    ("ort/../ort/model.onnx", "must be a relative path inside the artifact (no '..', not absolute)"),
    ("ort/./model.onnx", "must be a normalised path (no '.', '//' or trailing '/')"),
    ("ort//model.onnx", "must be a normalised path (no '.', '//' or trailing '/')"),
    ("ort\\..\\..\\x", "must be a relative path inside the artifact (no '..', not absolute)"),
    ("", "must be a relative path inside the artifact (no '..', not absolute)"),
])
@pytest.mark.parametrize("field", [("targets", "ort", "onnx"), ("targets", "ort", "files", 1, "path")])
def test_paths_must_stay_inside_out(artifact, field, name, why):
    path = edit_manifest(artifact, _set(*field, name))
    where = ".".join(str(k) for k in field).replace(".1.", "[1].")
    assert _refused(artifact) == f"{path}: {where} {name!r} {why}"


def test_symlink_out_of_out_is_refused(artifact, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(artifact / "ort" / "model.onnx", outside)
    (artifact / "ort" / "model.onnx").unlink()
    (artifact / "ort" / "model.onnx").symlink_to(outside)
    message = _refused(artifact)
    assert message == (f"{artifact / MANIFEST}: targets.ort.onnx: {artifact / 'ort' / 'model.onnx'} leads outside "
                       f"{artifact} (to {outside}); an artifact's files must be inside it")


def test_symlink_inside_out_is_followed(artifact):
    (artifact / "ort" / "model.onnx.data").rename(artifact / "weights.data")
    (artifact / "ort" / "model.onnx.data").symlink_to("../weights.data")
    assert set(read_manifest(artifact).targets) == {"ort"}


def test_manifest_symlink_out_of_out_is_refused(artifact, tmp_path):
    real = tmp_path / "elsewhere.json"
    (artifact / MANIFEST).rename(real)
    (artifact / MANIFEST).symlink_to(real)
    assert "leads outside" in _refused(artifact)


def _in_subprocess(code: str, timeout: float = 60):
    """Run `code` in a fresh interpreter; a hang fails the test instead of blocking the suite."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("which", [MANIFEST, "ort/model.onnx", "ort/model.onnx.data"])
def test_fifo_is_refused_without_hanging(artifact, which):
    (artifact / which).unlink()
    os.mkfifo(artifact / which)
    run = _in_subprocess("from mixexport.artifact.manifest import read_manifest; from mixexport.errors import "
                         "MixexportError\ntry:\n    read_manifest(%r)\nexcept MixexportError as e:\n    print(e)"
                         % str(artifact))
    assert run.returncode == 0, run.stderr
    assert "FIFO" in run.stdout or "is not a regular file" in run.stdout, run.stdout


def test_manifest_a_directory_is_refused(artifact):
    (artifact / MANIFEST).unlink()
    (artifact / MANIFEST).mkdir()
    assert "is not a regular file" in _refused(artifact)


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe{}", "not UTF-8 text (byte 0): not a JSON file"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to be a valid file"),
    (b"[1, 2]", "must hold a JSON object, found list"),
    (b'{"format": 2, "format": 2}', "key 'format' appears twice in one JSON object"),
    (b'{"format": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"{not json", "not valid JSON"),
])
def test_unreadable_json_is_one_line(artifact, raw, message):
    (artifact / MANIFEST).write_bytes(raw)
    assert _refused(artifact).startswith(f"{artifact / MANIFEST}: {message}")


def test_nan_is_refused(artifact):
    text = (artifact / MANIFEST).read_text().replace('"batch": [\n      1,', '"batch": [\n      NaN,')
    assert "NaN" in text
    (artifact / MANIFEST).write_text(text)
    assert _refused(artifact) == f"{artifact / MANIFEST}: dynamic_dims.batch[0] is nan, which JSON does not allow"


@pytest.mark.parametrize("literal, message", [
    ('1e400', "targets.ort.files[0].bytes is inf, which JSON does not allow"),
    ('"ort/\\ud800"', "targets.ort.files[0].bytes holds a lone surrogate, not Unicode text"),
])
def test_values_json_does_not_hold_are_refused(artifact, literal, message):
    raw = json.loads((artifact / MANIFEST).read_text())
    raw["targets"]["ort"]["files"][0]["bytes"] = "PLACEHOLDER"
    (artifact / MANIFEST).write_text(json.dumps(raw).replace('"PLACEHOLDER"', literal))
    assert _refused(artifact) == f"{artifact / MANIFEST}: {message}"


def test_oversized_manifest_is_refused_before_reading(artifact):
    with open(artifact / MANIFEST, "ab") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    assert f"more than the {MAX_MANIFEST_BYTES} bytes" in _refused(artifact)


def test_inspect_and_validate_give_one_line_errors(artifact):
    path = edit_manifest(artifact, _set("targets", "ort", "files", 0, "bytes", "many"))
    for command in ("inspect", "validate"):
        assert error_line(run_cli(command, artifact)) == (
            f"error: {path}: targets.ort.files[0].bytes must be a non-negative integer")


@pytest.mark.parametrize("raw", [b"\x00\x01garbage\xff" * 100, b"", b"\x08\x96\x01" * 50])
def test_inspect_of_a_non_onnx_file_is_one_line(tmp_path, raw):
    path = tmp_path / "model.onnx"
    path.write_bytes(raw)
    result = run_cli("inspect", path)
    assert result.exit_code in (0, 1) and "Traceback" not in result.output
    if result.exit_code == 1:
        assert error_line(result).startswith(f"error: {path} is not a readable ONNX model")


def test_inspect_of_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "model.onnx")
    run = _in_subprocess("import sys; from mixexport.cli.main import main; sys.argv = ['mixexport', 'inspect', %r]; "
                         "main()" % str(tmp_path / "model.onnx"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "FIFO" in run.stderr, run.stderr


def test_write_json_atomic_replaces_whole(tmp_path):
    write_json_atomic(tmp_path / MANIFEST, {"a": 1})
    write_json_atomic(tmp_path / MANIFEST, {"a": 2})
    assert json.loads((tmp_path / MANIFEST).read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temporary file left


def test_write_json_atomic_os_error_is_one_line(tmp_path):
    with pytest.raises(MixexportError) as err:
        write_json_atomic(tmp_path / "gone" / MANIFEST, {"a": 1})
    assert str(err.value) == f"{tmp_path / 'gone' / MANIFEST}: no such file or directory"


def test_write_json_atomic_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / MANIFEST, {"a": float("nan")})
    assert list(tmp_path.iterdir()) == []


def _leaves(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:2]):
            yield from _leaves(item, (*path, i))


def test_every_field_mutated_gives_a_one_line_error_or_reads(artifact):
    """Each field of a real manifest replaced by values of other types and ranges: read_manifest and
    inspect either accept it or raise one MixexportError line, never anything else."""
    from mixexport.artifact.inspect import inspect_path

    base = json.loads((artifact / MANIFEST).read_text())
    mutations = refused = 0
    for path in [p for p in _leaves(base) if p]:
        for value in (None, "x", -1, 1.5, {}, [0], 10**20, "../x"):
            manifest = json.loads(json.dumps(base))
            node = manifest
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            (artifact / MANIFEST).write_text(json.dumps(manifest))
            mutations += 1
            try:
                inspect_path(artifact)
            except MixexportError as exc:
                assert "\n" not in str(exc) and str(exc).startswith(str(artifact)), str(exc)
                refused += 1
    # (tools, created and source.config are free-form here: config.json's own parser checks the latter)
    assert mutations > 500 and refused > 0.5 * mutations, (mutations, refused)
