"""Artifacts built once per test session and shared by tests/artifact, tests/capture and tests/validate.

Every build goes through the public Python API (`reference_source` + `build`) into a session
temp dir. Builds are memoised per config (capture costs ~10 s each on 2 cores); tests that damage
an artifact copy it first. The config set is the full cross product E in {4, 8} x top-k in {1, 2}
x {float32, float16}. The trt target is built only where the MixtralMoE plugin has kernels for the
dtype (float16 here): a float32 trt graph fails validation, since no engine could run it.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from mixexport.driver.build import BuildOptions, build, reference_source
from mixexport.targets import BACKENDS, TARGETS
from mixexport.capture.export import attach_checkpoint_weights, capture_decoder
from mixexport.checkpoint.reader import Checkpoint

SEED = 0
# name -> (num_local_experts, num_experts_per_tok, dtype)
CONFIGS = {f"e{e}-k{k}-{dtype}": (e, k, dtype)
           for e in (4, 8) for k in (1, 2) for dtype in ("float32", "float16")}
# Small dynamic ranges keep the manifest and graphs tiny; validation needs batch 2 and 7 + 4 tokens.
RANGES = dict(max_batch=4, max_sequence=32, max_context=64)

_builds: dict[str, tuple[Path, dict, list[str]]] = {}


def overrides(name: str) -> dict:
    experts, top_k, dtype = CONFIGS[name]
    return {"num_local_experts": experts, "num_experts_per_tok": top_k, "dtype": dtype}


def targets_of(name: str) -> tuple[str, ...]:
    """The targets `built(name)` holds: those whose backend serves the dtype (trt: not float32)."""
    dtype = CONFIGS[name][2]
    return tuple(t for t in TARGETS if dtype in BACKENDS[t].dtypes)


def built(name: str, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """(OUT, manifest returned by build, progress lines) for one of CONFIGS, built and validated once."""
    if name not in _builds:
        out = tmp_path_factory.mktemp(f"build-{name}") / "out"
        lines: list[str] = []
        with reference_source(None, "tiny", SEED, overrides(name), lines.append) as (ckpt, source):
            manifest = build(ckpt, source, out, BuildOptions(targets=targets_of(name), **RANGES), lines.append)
        _builds[name] = (out, manifest, lines)
    return _builds[name]


_unvalidated: dict[tuple, tuple[Path, dict, list[str]]] = {}


def unvalidated_build(name: str, targets: tuple[str, ...], tmp_path_factory,
                      dtype: str | None = None) -> tuple[Path, dict, list[str]]:
    """(OUT, manifest, progress lines) of CONFIGS[name] (graph dtype `dtype` if given) for `targets`,
    built once with validate=False: artifacts that validation cannot pass here (a float32 trt
    graph, bfloat16 graphs on CPU). Shared: copy before damaging."""
    key = (name, targets, dtype)
    if key not in _unvalidated:
        out = tmp_path_factory.mktemp(f"unvalidated-{name}") / "out"
        lines: list[str] = []
        with reference_source(None, "tiny", SEED, overrides(name), lines.append) as (ckpt, source):
            manifest = build(ckpt, source, out, BuildOptions(targets=targets, dtype=dtype, validate=False, **RANGES),
                             lines.append)
        _unvalidated[key] = (out, manifest, lines)
    return _unvalidated[key]


def captured_with_weights(checkpoint_dir: Path) -> tuple[ir.Model, Checkpoint]:
    """A freshly captured decoder for the checkpoint, with its weights attached (lazily)."""
    ckpt = Checkpoint(checkpoint_dir)
    model = capture_decoder(ckpt.config, ckpt.config.dtype, max_batch=4, max_sequence=32, max_total=64)
    attach_checkpoint_weights(model, ckpt, ckpt.config.dtype)
    return model, ckpt


_captured: dict[Path, tuple[ir.Model, Checkpoint]] = {}


def captured_once(checkpoint_dir: Path) -> tuple[ir.Model, Checkpoint]:
    """`captured_with_weights`, memoised per checkpoint: callers clone before mutating."""
    if checkpoint_dir not in _captured:
        _captured[checkpoint_dir] = captured_with_weights(checkpoint_dir)
    return _captured[checkpoint_dir]


_forced: dict[str, tuple[Path, dict]] = {}
STALE_MARKER = "stale-from-an-old-build.txt"


def forced_unvalidated_ort_build(tmp_path_factory) -> tuple[Path, dict]:
    """tiny (E4, top-2, fp32), ort only, validate=False, built with force=True over an OUT that
    already held a stale file. Shared: copy before damaging."""
    if "ort" not in _forced:
        out = tmp_path_factory.mktemp("forced") / "out"
        out.mkdir()  # an older artifact (--force replaces only artifacts)
        (out / "manifest.json").write_text('{"format": 1, "tools": {"mixexport": "0.0"}, "targets": {}}\n')
        (out / STALE_MARKER).write_text("old artifact\n")
        with reference_source(None, "tiny", SEED, overrides("e4-k2-float32"), lambda _: None) as (ckpt, source):
            manifest = build(ckpt, source, out, BuildOptions(targets=("ort",), force=True, validate=False, **RANGES),
                             lambda _: None)
        _forced["ort"] = (out, manifest)
    return _forced["ort"]


def edit_manifest(out: Path, change) -> Path:
    """Apply `change(manifest)` to OUT/manifest.json in place; returns its path (as errors name it)."""
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


def run_cli(*args: str):
    """Invoke `mixexport ARGS` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from mixexport.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="mixexport")


def error_line(result) -> str:
    """The user-facing error: exactly one `error:` line on stderr and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def rewrite_initializer(out: Path, target: str, name: str, edit) -> None:
    """Replace the bytes of initializer `name` in OUT/target's external data with `edit(bytes)`
    (same length), re-recording the target's file entries so validation reaches the numerics."""
    import onnx

    from mixexport.artifact.manifest import file_entry

    model = onnx.load(str(out / target / "model.onnx"), load_external_data=False)
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    path = out / target / info["location"]
    data = bytearray(path.read_bytes())
    new = edit(bytes(data[offset:offset + length]))
    assert len(new) == length, "an edit keeps the tensor's size"
    data[offset:offset + length] = new
    path.write_bytes(bytes(data))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["targets"][target]
    entry["files"] = [file_entry(out / f["path"], out) for f in entry["files"]]
    (out / "manifest.json").write_text(json.dumps(manifest))
