"""`OUT/manifest.json`: what was built, from what, with which tools, and every file's hash.

Validation, inspection, the TensorRT build and runtimes read the manifest instead of guessing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixexport import __version__
from mixexport.errors import MixexportError

if TYPE_CHECKING:
    from mixexport.checkpoint.reader import Checkpoint

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_TOOLS = ("torch", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "polygraphy", "safetensors",
          "transformers", "triton", "tensorrt")


def tool_versions() -> dict[str, str]:
    versions = {"mixexport": __version__}
    for name in _TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path, root: Path, sha256: str | None = None) -> dict[str, Any]:
    """The manifest record of one file; `sha256` when the writer already hashed what it wrote."""
    return {"path": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": sha256 or sha256_file(path)}


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

    Raises:
        MixexportError: naming the first file that is missing or whose weights changed.
    """
    root = ckpt.path.resolve()
    verify_files(root, [e for e in entries if "sha256" in e], what)
    weights = None
    for entry in (e for e in entries if "weights_sha256" in e):
        path = root / entry["path"]
        if not path.exists():
            raise MixexportError(f"{what}: {path} is missing")
        weights = weights or ckpt.weights_sha256()
        if path.stat().st_size != entry["bytes"] or weights.get(entry["path"]) != entry["weights_sha256"]:
            raise MixexportError(f"{what}: the weights in {path} have changed since the build "
                                 f"(size or tensor sha256 differ)")


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(out: str | Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise MixexportError(f"{path} not found: is {out} a mixexport build directory?") from None
    except json.JSONDecodeError as exc:
        raise MixexportError(f"{path} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise MixexportError(f"{path}: manifest format {manifest.get('format')!r} is not {FORMAT_VERSION}; "
                             f"rebuild with mixexport {__version__}")
    return manifest


def verify_files(root: Path, entries: list[dict[str, Any]], what: str) -> None:
    """Check that files exist with the recorded size and hash.

    Raises:
        MixexportError: naming the first file that is missing or changed.
    """
    for entry in entries:
        path = root / entry["path"]
        if not path.exists():
            raise MixexportError(f"{what}: {path} is missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise MixexportError(f"{what}: {path} has changed since the build (size or sha256 differ)")
