"""What an artifact holds, read from its files and cross-checked against its manifest.

Validation must not take the manifest's word for what to check: a manifest that forgets a
target, drops a file list or names another target's graph would otherwise make the gate pass
on less than the artifact holds. So the targets are the directories present in OUT, each with
its `model.onnx`; every file in a target directory must be listed in that target's manifest
entry and every listed file must exist (with its size, and its sha256 when asked); the graph's
external data may only live in its own listed files; and each graph's dtype is read from the
graph itself, and must agree with the manifest's.

Nothing outside OUT is opened: every path goes through `artifact_path`, and a FIFO or device
in a file's place is refused from `lstat`, before anything could block on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
import posixpath
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import onnx

from mixexport import graph_io
from mixexport.artifact.inspect import MOE_KINDS, binding, dtype_name, load_graph
from mixexport.artifact.manifest import MANIFEST, Manifest, TargetRecord, artifact_path, path_problem
from mixexport.artifact.save import ONNX_FILE
from mixexport.artifact.stage_chain import as_stage
from mixexport.dtypes import BY_ONNX
from mixexport.errors import MixexportError
from mixexport.safe_io import open_regular, os_error
from mixexport.targets import BACKENDS, TARGETS

REPORT_FILE = "validation.json"


@dataclasses.dataclass
class TargetGraph:
    """One target directory of OUT, checked against the manifest."""

    name: str
    folder: Path  # OUT/<name>, symlinks resolved: onnxruntime reads external data from here
    model: onnx.ModelProto  # the graph, external data not loaded
    dtype: str  # read from the graph's past_key_values inputs and float initializers
    engine: bool  # a TensorRT engine is part of this target
    stages: list["StageGraph"] = dataclasses.field(default_factory=list)  # a staged target's chain, in order
    # The op library its sessions load (ort: `--ort-moe-library`), set by validation only where the
    # user named one: an artifact's own native code is never loaded unasked.
    library: Path | None = None


@dataclasses.dataclass
class StageGraph:
    """One stage graph of a staged target (`build --stages N`), checked against its stage record."""

    stage: graph_io.Stage
    folder: str  # relative to the target's folder ("stage-0"): where its external data lives
    model: onnx.ModelProto  # external data not loaded
    weight_bytes: int  # of its data files


class FileHashes:
    """The sha256 checks of an artifact's files, each file hashed in one sequential pass that
    validation may start ahead of time (`read_ahead`, in a background thread) while it reads the
    file's weights, and completes with `finish` before it gives a verdict.

    Why not hash every file before validating: that reads the weights from disk twice (an
    8-layer 8x7B-shaped artifact holds 23 GB; the page cache has long dropped a file's first
    pages when onnxruntime reads them), and hashing is one thread's work that nothing else
    overlaps. Layer-streamed validation has a weight file hashed up to the end of the weights of
    the stage it is about to compare while it runs that stage's reference, so onnxruntime finds
    those bytes in the page cache (the disk is read once) and the hashing runs beside the
    reference's work. A mismatch fails as the up-front check did.
    """

    def __init__(self) -> None:
        self._pending: dict[Path, _PendingHash] = {}
        self._worker: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []

    def add(self, file: Path, sha256: str, target: str) -> None:
        """Check `file` (of `target`) against `sha256` by `finish` at the latest."""
        self._pending[file.resolve()] = _PendingHash(file, sha256, target, hashlib.sha256())

    def read_ahead(self, file: Path, end: int) -> None:
        """Start hashing `file` up to byte `end` in the background, if it is a file still to check
        (else nothing). Hashing releases the GIL: it overlaps what the caller does next."""
        pending = self._pending.get(file.resolve())
        if pending is not None:
            self._worker = self._worker or ThreadPoolExecutor(1, thread_name_prefix="mixexport-sha256")
            self._queued.append(self._worker.submit(pending.advance, end))

    def finish(self, files: Iterable[Path] | None = None) -> None:
        """Hash the rest of every file still to check (or of those of `files`) and compare.

        Raises:
            MixexportError: naming the first file whose sha256 is not the manifest's (or that
                could not be read).
        """
        self._wait()
        for key in list(self._pending) if files is None else [f.resolve() for f in files]:
            pending = self._pending.pop(key, None)
            if pending is not None:
                pending.check()

    def _wait(self) -> None:
        """Let the background hashing end (re-raising its error)."""
        queued, self._queued = self._queued, []
        try:
            for future in queued:
                future.result()
        finally:
            if self._worker is not None and not self._queued:
                self._worker.shutdown()
                self._worker = None


@dataclasses.dataclass
class _PendingHash:
    file: Path
    expected: str
    target: str
    digest: "hashlib._Hash"
    done: int = 0  # bytes hashed so far, from the start

    def advance(self, end: int | None) -> None:
        """Hash from where it stopped up to byte `end` (None: the end of the file)."""
        chunk = 16 * 1024 * 1024
        f, _ = open_regular(self.file)
        try:
            with f:
                f.seek(self.done)
                while end is None or self.done < end:
                    data = f.read(chunk if end is None else min(chunk, end - self.done))
                    if not data:
                        break
                    self.digest.update(data)
                    self.done += len(data)
        except OSError as exc:
            raise os_error(exc, self.file) from None

    def check(self) -> None:
        self.advance(None)
        if self.digest.hexdigest() != self.expected:
            raise MixexportError(f"target {self.target}: {self.file} has changed since the build (size or sha256 "
                                 f"differ)")


def external_extents(model: onnx.ModelProto) -> dict[str, int]:
    """External data location -> the end of the last byte the graph's tensors read there."""
    ends: dict[str, int] = {}
    for tensor in graph_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            end = int(entry.get("offset", 0)) + int(entry.get("length", 0))
            ends[entry.get("location", "")] = max(ends.get(entry.get("location", ""), 0), end)
    return ends


def artifact_targets(root: Path, manifest: Manifest, hashes: FileHashes | None) -> dict[str, TargetGraph]:
    """Every target the artifact holds, from its directories, after checking them against the manifest.

    Args:
        root: OUT.
        manifest: its schema-checked manifest (`check_manifest`).
        hashes: also compare every file's sha256 with the manifest's (sizes always are): a target's
            weight files (its graphs' external data) are added to `hashes`, for the caller to check
            while it reads them (`FileHashes`); its other files are checked here. None: sizes only.

    Returns:
        target name -> `TargetGraph`, in the manifest's order.

    Raises:
        MixexportError: one line naming the file or manifest field on any disagreement.
    """
    where = root / MANIFEST
    present = _target_dirs(root)
    recorded = manifest.targets
    for name in present:
        if name not in recorded:
            raise MixexportError(f"{root / name} is a target directory that {where} does not list in targets")
    for name in recorded:
        if name not in present:
            raise MixexportError(f"{where}: targets.{name} has no directory {root / name}")
    return {name: _target_graph(root, name, entry, manifest.dtype, hashes)
            for name, entry in recorded.items()}


def _target_graph(root: Path, name: str, entry: TargetRecord, dtype: str, hashes: FileHashes | None) -> TargetGraph:
    """One target directory checked against its manifest entry (`artifact_targets`)."""
    where = root / MANIFEST
    listed = _listed_files(root, name, entry, hashes)
    try:
        on_disk = set(_walk_files(root, name))
    except RecursionError:
        raise MixexportError(f"{root / name}: folders nested too deeply to be an artifact") from None
    # (Every listed file exists: _listed_files checked each one.)
    unlisted = sorted(on_disk - set(listed))
    if unlisted:
        raise MixexportError(f"{root / unlisted[0]} is not listed in {where} (targets.{name}): an artifact holds "
                             f"only the files its manifest records")
    onnx_name = f"{name}/{ONNX_FILE}"
    if entry.onnx != onnx_name:
        raise MixexportError(f"{where}: targets.{name}.onnx is {entry.onnx!r}; the {name} graph is {onnx_name!r}")
    if onnx_name not in listed:
        raise MixexportError(f"{root / onnx_name} is missing (targets.{name}.files does not list it)")
    graph_path = artifact_path(root, onnx_name, f"{where}: targets.{name}.onnx")
    model = load_graph(graph_path)
    weights = _check_external_data(model, graph_path, name, listed, where)
    graph = graph_dtype(model, graph_path)
    for field, value in (("dtype", dtype), (f"targets.{name}.dtype", entry.dtype)):
        if value != graph:
            raise MixexportError(f"{where}: {field} is {value!r} but {graph_path} is a {graph} graph")
    _check_description(model, entry.inputs, entry.outputs, entry.moe_op, entry.moe_nodes, graph_path,
                       f"{where}: targets.{name}")
    stages = [_stage_graph(root, name, i, record, entry, graph, listed) for i, record in enumerate(entry.stages or [])]
    if hashes is not None:  # all but the weight files (which the caller checks as it reads them) now
        weights |= {path for record in entry.stages or [] for path in record["data"]}
        hashes.finish(root / path for path in listed if path not in weights)
    return TargetGraph(name, (root / name).resolve(), model, graph, bool(BACKENDS[name].extra_targets(entry.extra)),
                       stages)


def _stage_graph(root: Path, target: str, index: int, record: dict, entry: TargetRecord, dtype: str,
                 listed: dict[str, str]) -> StageGraph:
    """Stage `index` of a staged target, checked like the target's graph: its bindings and MoE
    nodes are the record's, its dtype the target's, and its external data only in its own files."""
    where = f"{root / MANIFEST}: targets.{target}.stages[{index}]"
    path = artifact_path(root, record["onnx"], f"{where}.onnx")
    model = load_graph(path)
    folder = posixpath.dirname(record["onnx"])
    _check_external_data(model, path, folder, {p: f"stages[{index}].data" for p in record["data"]}, where)
    if graph_dtype(model, path) != dtype:
        raise MixexportError(f"{where}: {path} is a {graph_dtype(model, path)} graph, the target is {dtype}")
    stage = as_stage(record)
    moe_nodes = (stage.end - stage.first) if entry.moe_op is not None else 0
    _check_description(model, record["inputs"], record["outputs"], entry.moe_op, moe_nodes, path, where)
    return StageGraph(stage, posixpath.relpath(folder, target), model,
                      sum((root / p).stat().st_size for p in record["data"]))


def _check_description(model: onnx.ModelProto, inputs: list[dict], outputs: list[dict], moe_op: str | None,
                       moe_nodes: int, path: Path, where: str) -> None:
    """The manifest's account of a graph (its bindings, which runtimes and the TensorRT profiles
    read, and its MoE op) must be the graph's."""
    for kind, values, recorded in (("inputs", model.graph.input, inputs), ("outputs", model.graph.output, outputs)):
        actual = [binding(v) for v in values]
        if actual != recorded:
            first = next((i for i, (a, b) in enumerate(zip(actual, recorded)) if a != b),
                         min(len(actual), len(recorded)))
            raise MixexportError(f"{where}.{kind} differ from {path}'s at [{first}] "
                                 f"(graph: {actual[first] if first < len(actual) else 'none'})")
    kinds = Counter(f"{n.domain}.{n.op_type}" for n in model.graph.node if (n.domain, n.op_type) in MOE_KINDS)
    if moe_op is None and kinds or moe_op is not None and (set(kinds) != {moe_op} or kinds[moe_op] != moe_nodes):
        raise MixexportError(f"{where}: moe_op {moe_op!r} x {moe_nodes} but {path} holds "
                             f"{dict(kinds) or 'no MoE node'}")


def _target_dirs(root: Path) -> list[str]:
    """The target directories in OUT; any other directory there is refused (it could be a target
    this version does not know, which would go unchecked)."""
    names = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise MixexportError(f"{root}: cannot list the artifact ({exc.strerror})") from None
    for entry in entries:
        if entry.name in (MANIFEST, REPORT_FILE) or not entry.is_dir():  # is_dir follows a symlink
            continue
        if entry.name not in TARGETS:
            raise MixexportError(f"{root / entry.name} is a directory but not a target ({', '.join(TARGETS)}): "
                                 f"an artifact holds only its targets")
        if entry.is_symlink():
            raise MixexportError(f"{root / entry.name} is a symlink: a target must be a directory inside {root}")
        names.append(entry.name)
    return names


def _walk_files(root: Path, target: str) -> Iterator[str]:
    """Relative paths of every file under OUT/<target>, refusing anything but files, folders and
    symlinks to regular files inside OUT (which `artifact_path` resolves)."""
    for folder, dirs, files in os.walk(root / target, onerror=_raise_walk_error):
        rel_folder = Path(folder).relative_to(root).as_posix()
        for d in dirs:
            if os.path.islink(os.path.join(folder, d)):
                raise MixexportError(f"{Path(folder) / d} is a symlink to a directory; an artifact's folders must be "
                                     f"real directories")
        for f in files:
            path = Path(folder) / f
            mode = path.lstat().st_mode
            rel = f"{rel_folder}/{f}"
            if stat.S_ISLNK(mode):
                artifact_path(root, rel, f"{path}")  # inside OUT and a regular file, or refused
            elif not stat.S_ISREG(mode):
                raise MixexportError(f"{path} is not a regular file (a FIFO, socket or device?): an artifact holds "
                                     f"regular files only")
            yield rel


def _raise_walk_error(exc: OSError) -> None:
    raise MixexportError(f"{exc.filename}: cannot be listed ({exc.strerror})")


def _listed_files(root: Path, target: str, entry: TargetRecord, hashes: FileHashes | None) -> dict[str, str]:
    """Relative path -> manifest field, for every file the target's entry lists (its `files` and
    those of its backend's own fields); each is checked (its size now, its sha256 by `hashes`)."""
    where = root / MANIFEST
    listed: dict[str, str] = {}
    groups = [("files", entry.files, target),
              *BACKENDS[target].entry_file_groups(entry.extra, f"{where}: targets.{target}")]
    for group, files, folder in groups:
        for i, f in enumerate(files):
            field = f"targets.{target}.{group}[{i}].path"
            path = f["path"]
            prefix = f"{folder}/"
            if not path.startswith(prefix):
                raise MixexportError(f"{where}: {field} is {path!r}, outside {prefix}")
            if path in listed:
                raise MixexportError(f"{where}: {field} lists {path} a second time ({listed[path]})")
            listed[path] = field
            file = artifact_path(root, path, f"{where}: {field}")
            size = file.stat().st_size
            if size != f["bytes"]:
                raise MixexportError(f"target {target}: {file} has changed since the build (size or sha256 differ)")
            if hashes is not None:
                hashes.add(file, f["sha256"], target)
    return listed


def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, sparse initializers' values and indices, and
    tensor attributes, in subgraphs (If branches) too. Iterative: a hostile nesting depth
    cannot exhaust the stack."""
    graphs = [graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _check_external_data(model: onnx.ModelProto, path: Path, folder: str, listed: dict[str, str], where) -> set[str]:
    """Every external tensor of the graph (in OUT's `folder`) must live in one of the `listed`
    files: its own target's (a stage graph: its own stage's). Returns those files (relative to OUT)."""
    used = set()
    for tensor in graph_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        rel = None if path_problem(location) else posixpath.join(folder, location)
        if rel is None or rel not in listed:
            raise MixexportError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which is not one of "
                                 f"the {folder} files {where} lists")
        used.add(rel)
    return used


def graph_dtype(model: onnx.ModelProto, path: Path) -> str:
    """The graph's dtype: the element type of its past_key_values inputs and float initializers.

    Raises:
        MixexportError: when the graph has no KV-cache inputs or mixes float dtypes.
    """
    kinds = {i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past_key_values.")}
    if not kinds:
        raise MixexportError(f"{path} has no {graph_io.past_names(0)[0]} input: not a mixexport decoder graph")
    kinds |= {t.data_type for t in model.graph.initializer if t.data_type in BY_ONNX}
    if len(kinds) != 1 or next(iter(kinds)) not in BY_ONNX:
        names = sorted(dtype_name(k) for k in kinds)
        raise MixexportError(f"{path}: past_key_values inputs and float weights are {', '.join(names)}: one "
                             f"graph dtype (float32, float16 or bfloat16) expected")
    return BY_ONNX[next(iter(kinds))].name
