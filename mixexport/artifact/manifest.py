"""`OUT/manifest.json`: what was built, from what, with which tools, and every file's hash.

Validation, inspection, the TensorRT build and runtimes read the manifest instead of guessing, so
`read_manifest` trusts nothing in it: the file is read with a size bound (a regular file only,
never blocking on a FIFO), parsed strictly, checked against a schema for every field's type and
range (errors name the field: `OUT/manifest.json: targets.ort.files[0].bytes must be ...`), and
every path it names must stay inside OUT, lexically and after resolving symlinks (`artifact_path`).
The result is a typed `Manifest`; `write_manifest` is the one writer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixexport import __version__, graph_io
from mixexport.artifact.stage_chain import MAX_STAGES, check_chain
from mixexport.dtypes import DTYPES as GRAPH_DTYPES
from mixexport.errors import MixexportError
from mixexport.quant import QuantScheme
from mixexport.safe_io import fsync_dir, open_regular, os_error, parse_json_object, read_regular
from mixexport.schema import (FILE, SHA256, Invalid, absolute_path, array, boolean, either, exactly, integer, join,
                              mapping, nullable, number, path_problem, record, relative_path, text)
from mixexport.targets import BACKENDS, TARGETS

if TYPE_CHECKING:
    from mixexport.checkpoint.reader import Checkpoint

MANIFEST = "manifest.json"
# 2: validation statuses are pass / fail / not validated (1 recorded skipped targets as passed).
FORMAT_VERSION = 2
# A manifest lists a few files per target (about a hundred kernel files for trt): far below this.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_TOOLS = ("torch", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "polygraphy", "safetensors",
          "transformers", "triton", "tensorrt")
DTYPES = tuple(GRAPH_DTYPES)
VALIDATION_STATUSES = ("pass", "fail", "not validated")
_INT64_MAX = 2**63 - 1


def tool_versions() -> dict[str, str]:
    versions = {"mixexport": __version__}
    for name in _TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: Path) -> str:
    """The sha256 of a regular file (refusing FIFOs, devices and directories without blocking)."""
    digest = hashlib.sha256()
    f, _ = open_regular(path)
    try:
        with f:
            while chunk := f.read(16 * 1024 * 1024):
                digest.update(chunk)
    except OSError as exc:
        raise os_error(exc, path) from None
    return digest.hexdigest()


def file_entry(path: Path, root: Path, sha256: str | None = None) -> dict[str, Any]:
    """The manifest record of one file; `sha256` when the writer already hashed what it wrote."""
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
            "sha256": sha256 or sha256_file(path)}


def checkpoint_entries(ckpt: "Checkpoint") -> list[dict[str, Any]]:
    """The manifest record of a checkpoint's files: config.json by its sha256, each safetensors
    file by its size and the fingerprint of the weights the model uses in it
    (`Checkpoint.weights_sha256`, which reuses the digests of tensors already read)."""
    root = ckpt.path.resolve()
    weights = ckpt.weights_sha256()
    return [file_entry(root / "config.json", root),
            *({"path": f.name, "bytes": f.stat().st_size, "weights_sha256": weights[f.name]}
              for f in ckpt.files if f.name in weights)]


def verify_checkpoint(ckpt: "Checkpoint", entries: list[dict[str, Any]], what: str) -> None:
    """Check that a checkpoint holds the weights a build recorded (`checkpoint_entries`).

    Only files the `Checkpoint` itself opened are looked at (its config.json and safetensors
    files, whose names and links it has checked); an entry naming any other file is refused, so
    a manifest cannot make this read outside the checkpoint.

    Raises:
        MixexportError: naming the first file that is missing, unknown or whose weights changed.
    """
    root = ckpt.path.resolve()
    shards = {f.name: f for f in ckpt.files}
    weights = None
    for entry in entries:
        name = entry["path"]
        if "sha256" in entry:
            if name != "config.json":
                raise MixexportError(f"{what}: the manifest records {name!r}, which is not the checkpoint's "
                                     f"config.json")
            _verify_file(root / name, entry["bytes"], entry["sha256"], what)
            continue
        if name not in shards:
            raise MixexportError(f"{what}: {root / name} is missing (not one of the checkpoint's safetensors files)")
        weights = weights or ckpt.weights_sha256()
        if shards[name].stat().st_size != entry["bytes"] or weights.get(name) != entry["weights_sha256"]:
            raise MixexportError(f"{what}: the weights in {root / name} have changed since the build "
                                 f"(size or tensor sha256 differ)")


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path` so that readers see the old file or the new one, never a part.

    A temporary file in the same directory is written and fsynced, then renamed over `path`, then
    the directory is fsynced (so the rename itself survives a crash).

    Raises:
        MixexportError: one line naming the path, for any OS error (read-only, full disk, ...).
    """
    path = Path(path)
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise os_error(exc, path) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_manifest(out: Path, manifest: "Manifest") -> None:
    """Write OUT/manifest.json atomically (`write_json_atomic`), checked against the schema first:
    the writer cannot record what the reader would refuse."""
    value = manifest.to_json()
    check_manifest(value, str(Path(out) / MANIFEST))
    write_json_atomic(Path(out) / MANIFEST, value)


def read_manifest(out: str | Path) -> "Manifest":
    """Read OUT/manifest.json, checking its schema and that every path it names is inside OUT.

    Returns:
        the typed manifest.

    Raises:
        MixexportError: one line naming the file and the field at fault.
    """
    root = Path(out)
    path = root / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise MixexportError(f"{path} not found: is {out} a mixexport build directory?")
    artifact_path(root, MANIFEST, str(path))  # a regular file inside OUT, even through a symlink
    manifest = Manifest.from_json(parse_json_object(read_regular(path, MAX_MANIFEST_BYTES), str(path)), str(path))
    check_manifest_paths(root, manifest, str(path))
    return manifest


# --- the schema -----------------------------------------------------------------------------------


def _dim(value, where) -> None:
    if isinstance(value, str):
        text(max_len=256)(value, where)
    else:
        integer()(value, where)


BINDING = record({"name": text(max_len=256), "dtype": text(("int64",) + DTYPES), "shape": array(_dim, max_len=16)})
_RANGE = array(integer(), 2, 2)
_TARGET_FIELDS = {"dtype": text(DTYPES), "files": array(FILE), "onnx": relative_path,
                  "inputs": array(BINDING), "outputs": array(BINDING), "moe_op": nullable(text(max_len=256)),
                  "moe_nodes": integer(), "passes": mapping(integer())}
# A staged target (`build --stages N`): its chain of stage graphs (`artifact.stage_chain`).
STAGE = record({"name": text(max_len=256), "layers": _RANGE, "embedding": boolean, "head": boolean,
                "onnx": relative_path, "data": array(relative_path, 1, 64), "inputs": array(BINDING),
                "outputs": array(BINDING), "next": mapping(text(max_len=256))})
_OPTIONAL_TARGET_FIELDS = {"stages": array(STAGE, 2, MAX_STAGES)}
# The model summary (`MixtralConfig.summary()`): the sizes every reader of the manifest uses are
# checked; more fields may come and go with the config.
MODEL = record({name: integer(1) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_local_experts", "num_experts_per_tok", "vocab_size")},
               open_=True)
SOURCE = either(
    (lambda v: v.get("kind") == "preset",
     record({"kind": exactly("preset"), "preset": text(max_len=256), "seed": integer(),
             "config": mapping(lambda v, w: None)})),  # config.json's own parser checks it
    (lambda v: v.get("kind") == "checkpoint",
     record({"kind": exactly("checkpoint"), "path": absolute_path, "files": array(either(
         (lambda v: "sha256" in v, FILE),
         (lambda v: "weights_sha256" in v,
          record({"path": relative_path, "bytes": integer(), "weights_sha256": SHA256}))))})),
)
SUMMARY = record({"passed": boolean, "targets": mapping(text(VALIDATION_STATUSES)),
                  "failed_targets": array(text(max_len=256)), "router_agreement": mapping(nullable(number(0, 1))),
                  "not_validated": array(text(max_len=256)), "compared": integer()},
                 {"mode": text(("whole", "streamed"))})  # absent: nothing was compared (or an older build)


def _dynamic_dims(value, where) -> None:
    # kv_buffer_length: only where a target has the shared-buffer KV layout.
    record({name: _RANGE for name in (graph_io.BATCH, graph_io.SEQUENCE, graph_io.PAST, graph_io.TOTAL)},
           {graph_io.KV_BUFFER: _RANGE})(value, where)
    for name, (lo, hi) in value.items():
        if lo > hi:
            raise Invalid(join(where, name), f"is [{lo}, {hi}]: the minimum exceeds the maximum")


def _targets(value, where) -> None:
    """Each target's entry: the common fields, and those its backend declares (`manifest_fields`)."""
    mapping(lambda v, w: None, keys=text(TARGETS))(value, where)
    for name, entry in value.items():
        record(_TARGET_FIELDS, {**_OPTIONAL_TARGET_FIELDS, **BACKENDS[name].manifest_fields})(entry, join(where, name))


def _experts_quant(value, where) -> None:
    """The experts' quantization scheme: exactly what `QuantScheme.to_json` writes for a valid one."""
    record({"bits": integer(0, 64), "group_size": nullable(integer(1, 1 << 20)), "symmetric": boolean,
            "storage": text(max_len=256)})(value, where)
    try:
        scheme = QuantScheme(value["bits"], value["group_size"])
    except MixexportError as exc:
        raise Invalid(where, str(exc)) from None
    if scheme.to_json() != value:
        raise Invalid(where, f"must be {json.dumps(scheme.to_json())} for {scheme.name} (the one stored layout)")


MANIFEST_SCHEMA = record(
    {"format": integer(0, 1_000_000), "created": text(max_len=64), "tools": mapping(text(max_len=256)),
     "model": MODEL, "dtype": text(DTYPES), "source": SOURCE, "dynamic_dims": _dynamic_dims, "targets": _targets},
    {"validation": SUMMARY, "experts_quant": _experts_quant},
)


# --- the typed manifest ---------------------------------------------------------------------------

@dataclasses.dataclass
class TargetRecord:
    """One target's entry: its graph, files and bindings, and in `extra` the fields its backend
    declares (`Backend.manifest_fields`; trt: kernels, engine), which that backend writes and reads."""

    dtype: str
    files: list[dict[str, Any]]  # `file_entry` records: path (relative to OUT), bytes, sha256
    onnx: str
    inputs: list[dict[str, Any]]  # bindings: name, dtype, shape (ints and dimension names)
    outputs: list[dict[str, Any]]
    moe_op: str | None
    moe_nodes: int
    passes: dict[str, int]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A staged target's chain (`artifact.stage_chain`); None: the whole graph only (the default layout).
    stages: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        staged = {} if self.stages is None else {"stages": self.stages}
        return {**{name: getattr(self, name) for name in _TARGET_FIELDS}, **staged, **self.extra}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "TargetRecord":
        """The record of a schema-checked entry."""
        return cls(**{name: value[name] for name in _TARGET_FIELDS}, stages=value.get("stages"),
                   extra={k: v for k, v in value.items() if k not in _TARGET_FIELDS and k not in _OPTIONAL_TARGET_FIELDS})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclasses.dataclass
class Manifest:
    """OUT/manifest.json as the code uses it; `read_manifest` and `write_manifest` are its one
    reader and one writer, and `MANIFEST_SCHEMA` is what the JSON must satisfy."""

    model: dict[str, Any]  # `MixtralConfig.summary()`
    dtype: str
    source: dict[str, Any]  # a preset (name, seed, config) or a checkpoint (path, files)
    dynamic_dims: dict[str, list[int]]  # graph_io dimension name -> [min, max]
    targets: dict[str, TargetRecord]
    format: int = FORMAT_VERSION
    created: str = dataclasses.field(default_factory=_now)
    tools: dict[str, str] = dataclasses.field(default_factory=tool_versions)
    validation: dict[str, Any] | None = None  # the parity report's summary, once validation ran
    experts_quant: dict[str, Any] | None = None  # `QuantScheme.to_json()` of quantized experts

    def to_json(self) -> dict[str, Any]:
        value = {"format": self.format, "created": self.created, "tools": self.tools, "model": self.model,
                 "dtype": self.dtype, "source": self.source, "dynamic_dims": self.dynamic_dims,
                 "targets": {name: t.to_json() for name, t in self.targets.items()}}
        if self.validation is not None:
            value["validation"] = self.validation
        if self.experts_quant is not None:
            value["experts_quant"] = self.experts_quant
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any], source: str) -> "Manifest":
        """The manifest of a parsed JSON object, after checking it against the schema.

        Raises:
            MixexportError: `SOURCE: FIELD must be ...`.
        """
        check_values(value, source)
        check_manifest(value, source)
        return cls(model=value["model"], dtype=value["dtype"], source=value["source"],
                   dynamic_dims=value["dynamic_dims"],
                   targets={name: TargetRecord.from_json(t) for name, t in value["targets"].items()},
                   format=value["format"], created=value["created"], tools=value["tools"],
                   validation=value.get("validation"), experts_quant=value.get("experts_quant"))

    def held_targets(self) -> list[str]:
        """What validation compares: every target, and what their backends add (the trt engine)."""
        return [held for name, t in self.targets.items() for held in (name, *BACKENDS[name].extra_targets(t.extra))]


def check_values(value: Any, source: str) -> None:
    """Refuse what Python's json reads but JSON does not hold: NaN and Infinity, and strings with
    lone surrogates (`"\\ud800"`), which no file name or terminal can take.

    Iterative, so a deeply nested value cannot exhaust the stack here.
    """
    stack = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise MixexportError(f"{source}: {where or 'the document'} is {v}, which JSON does not allow")
        if isinstance(v, str) and not _is_unicode(v):
            raise MixexportError(f"{source}: {where or 'the document'} holds a lone surrogate, not Unicode text")
        if isinstance(v, dict):
            for k, x in v.items():
                if not _is_unicode(k):
                    raise MixexportError(f"{source}: a key in {where or 'the document'} holds a lone surrogate, "
                                         f"not Unicode text")
                stack.append((join(where, k), x))
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]", x) for i, x in enumerate(v)]


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_manifest(manifest: Any, source: str) -> None:
    """Check a manifest dict against the schema (types, ranges, known fields, relative paths).

    Args:
        manifest: the parsed manifest.
        source: names the file in errors.

    Raises:
        MixexportError: `SOURCE: FIELD.PATH must be ...`.
    """
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT_VERSION:
        raise MixexportError(f"{source}: manifest format {manifest.get('format')!r} is not {FORMAT_VERSION}; "
                             f"rebuild with mixexport {__version__}")
    try:
        MANIFEST_SCHEMA(manifest, "")
    except Invalid as exc:
        raise MixexportError(f"{source}: {exc.where or 'the manifest'} {exc.what}") from None
    for name, entry in manifest["targets"].items():
        if "stages" in entry:
            try:
                check_chain(name, entry, manifest["model"]["num_hidden_layers"], f"targets.{name}")
            except Invalid as exc:
                raise MixexportError(f"{source}: {exc.where} {exc.what}") from None
    if "validation" in manifest:
        _check_summary(manifest["validation"], manifest["targets"], source)


def _check_summary(summary: dict[str, Any], targets: dict[str, Any], source: str) -> None:
    """A recorded validation summary must agree with itself and with the targets (inspect shows it)."""
    statuses = summary["targets"]
    held = {h for name, entry in targets.items()
            for h in (name, *BACKENDS[name].extra_targets(TargetRecord.from_json(entry).extra))}
    unknown = sorted(set(statuses) - held)
    if unknown:
        raise MixexportError(f"{source}: validation.targets names {', '.join(unknown)}, which the artifact does not "
                             f"hold")
    expected = {
        "failed_targets": [t for t, s in statuses.items() if s == "fail"],
        "not_validated": [t for t, s in statuses.items() if s == "not validated"],
        "router_agreement": sorted(statuses),
        "passed": summary["compared"] > 0 and all(s == "pass" for s in statuses.values()),
    }
    actual = {**{k: summary[k] for k in expected}, "router_agreement": sorted(summary["router_agreement"])}
    for field, value in expected.items():
        if actual[field] != value:
            raise MixexportError(f"{source}: validation.{field} is {actual[field]!r}, which disagrees with "
                                 f"validation.targets (expected {value!r})")


# --- paths inside OUT -------------------------------------------------------------------------------

def artifact_path(root: Path, name: str, source: str, kind: str = "file") -> Path:
    """The path of a file (or folder, `kind="dir"`) an artifact names, once it is known to be safe.

    `name` must be relative and normalised, stay inside OUT lexically, and still be inside OUT
    once every symlink on the way is resolved; and it must be a regular file (a directory).
    Nothing is opened, so a FIFO in a file's place is refused without blocking.

    Args:
        root: OUT.
        name: the relative path, as the manifest (or a graph) writes it.
        source: names the field in errors, e.g. "OUT/manifest.json: targets.ort.onnx".
        kind: "file" or "dir".

    Returns:
        root / name (not resolved).
    """
    problem = path_problem(name)
    if problem:
        raise MixexportError(f"{source}: {problem}")
    path = root / name
    try:
        resolved = path.resolve(strict=True)
        base = root.resolve(strict=True)
        st = os.stat(resolved)
    except FileNotFoundError:
        raise MixexportError(f"{source}: {path} is missing") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
        raise MixexportError(f"{source}: {path} cannot be resolved ({exc})") from None
    if not resolved.is_relative_to(base):
        raise MixexportError(f"{source}: {path} leads outside {root} (to {resolved}); an artifact's files must be "
                             f"inside it")
    ok = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    if not ok:
        raise MixexportError(f"{source}: {path} is not a {'directory' if kind == 'dir' else 'regular file'}")
    return path


def manifest_paths(manifest: "Manifest") -> list[tuple[str, str, str]]:
    """Every (field path, relative path, kind) of OUT the manifest names."""
    paths = []
    for target, entry in manifest.targets.items():
        where = f"targets.{target}"
        paths.append((f"{where}.onnx", entry.onnx, "file"))
        paths += [(f"{where}.files[{i}].path", f["path"], "file") for i, f in enumerate(entry.files)]
        paths += [(f"{where}.{field}", name, kind) for field, name, kind in BACKENDS[target].entry_paths(entry.extra)]
        for i, stage in enumerate(entry.stages or []):
            paths += [(f"{where}.stages[{i}].onnx", stage["onnx"], "file"),
                      *((f"{where}.stages[{i}].data[{k}]", p, "file") for k, p in enumerate(stage["data"]))]
    return paths


def check_manifest_paths(root: Path, manifest: "Manifest", source: str) -> None:
    """Check that every path a (schema-checked) manifest names is a regular file (folder) inside OUT."""
    for where, name, kind in manifest_paths(manifest):
        artifact_path(root, name, f"{source}: {where}", kind)


def verify_files(root: Path, entries: list[dict[str, Any]], what: str) -> None:
    """Check that an artifact's files are inside it and have the recorded size and hash.

    Raises:
        MixexportError: naming the first file that is missing, outside OUT or changed.
    """
    for entry in entries:
        _verify_file(artifact_path(root, entry["path"], what), entry["bytes"], entry["sha256"], what)


def _verify_file(path: Path, size: int, sha256: str, what: str) -> None:
    if not path.exists():
        raise MixexportError(f"{what}: {path} is missing")
    if path.stat().st_size != size or sha256_file(path) != sha256:
        raise MixexportError(f"{what}: {path} has changed since the build (size or sha256 differ)")
