"""Write random-weight checkpoints in the exact Hugging Face layout (`mixexport init`).

Every tensor is drawn from its own generator, seeded from (seed, tensor name): the weights do not
depend on sharding or write order, so a preset + seed regenerates the same checkpoint anywhere.
Shards are streamed tensor by tensor, so writing Mixtral 8x22B's shapes needs one tensor's memory.

Nothing that this run did not create is ever removed: the checkpoint is written into a staging
directory that this run creates (a unique name beside OUT), which is removed on any failure and
renamed to OUT in one step on success. OUT itself may exist only as an empty directory (which the
rename replaces atomically), and never as the current directory or one of its ancestors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mixexport.checkpoint import names
from mixexport.checkpoint.config import MixtralConfig
from mixexport.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from mixexport.checkpoint.safetensors_io import ST_CODES, write_safetensors
from mixexport.checkpoint.tokenizer import write_tokenizer
from mixexport.dtypes import torch_dtype
from mixexport.errors import MixexportError
from mixexport.safe_io import format_bytes, os_error

DEFAULT_SHARD_BYTES = 5 * 1024**3


def parse_size(text: str | int) -> int:
    """'500MB', '2GB', '1.5GiB' or a byte count -> bytes (Hugging Face's `max_shard_size` spelling).

    Any finite size of at least one byte is accepted; one larger than the model means a single
    file. NaN, infinities and sizes below one byte are refused.
    """
    if isinstance(text, int):
        value = text
    else:
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        raw = text.strip().upper()
        number = raw.rstrip("KMGTIB")
        try:
            value = float(number) * units[raw[len(number):]]
        except (ValueError, KeyError):
            raise MixexportError(f"--max-shard-size {text!r}: use a byte count or a size such as 500MB or "
                                 f"2GB") from None
        if not math.isfinite(value):
            raise MixexportError(f"--max-shard-size {text!r} must be a finite size such as 500MB or 2GB")
    if value < 1:
        raise MixexportError(f"--max-shard-size {text!r} must be at least one byte")
    return int(value)


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def random_tensor(config: MixtralConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The random value `init` writes for one tensor, in the config's dtype.

    Norm weights are near 1, the router is scaled so its logits are O(1) (decisive routing, as in
    trained models), other matrices use the usual 0.02 normal initialisation.
    """
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * values
    elif name.endswith("block_sparse_moe.gate.weight"):
        values = values / math.sqrt(config.hidden_size)
    else:
        values = 0.02 * values
    return values.to(torch_dtype(config.dtype))


def write_checkpoint(
    out: str | Path,
    config: MixtralConfig,
    seed: int = 0,
    max_shard_size: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write `config.json`, random safetensors shards (+ index when sharded) and a tokenizer
    (`mixexport.checkpoint.tokenizer`, for vocabularies that can hold one) into `out`.

    Args:
        out: a directory that does not exist yet or is empty (not the current directory or one of
            its ancestors); missing parents are created.
        config: the model shapes.
        seed: weights seed; the same config and seed always give the same weights.
        max_shard_size: bytes per shard, as `save_pretrained(max_shard_size=...)`.
        progress: called with one line per shard written.

    Returns:
        the checkpoint directory (absolute).

    Raises:
        MixexportError: for an `out` that cannot be used, too little free space, or any OS error
            while writing (naming the path); nothing this run created is left behind.
    """
    out = _checked_out(Path(os.path.abspath(out)))
    code = ST_CODES[torch_dtype(config.dtype)]
    itemsize = torch_dtype(config.dtype).itemsize
    shapes = names.expected_shapes(config)
    shards = _pack(shapes, itemsize, max_shard_size)
    total = names.weight_count(config) * itemsize

    created = _make_parents(out.parent)
    tmp = None
    try:
        _check_free_space(out.parent, total)
        # Our own staging directory: a unique name (so nothing of anyone else's is in the way)
        # short enough to be valid wherever OUT's name is.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.partial-", dir=out.parent))
        _write_into(tmp, config, shapes, shards, code, seed, total, progress)
        _install(tmp, out)
    except BaseException as exc:  # Ctrl-C included: what this run made goes, nothing else
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        if isinstance(exc, OSError):  # named by what the user named: the staging files are gone
            raise os_error(exc, out.parent if tmp is None else out) from None
        raise
    return out


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished staging directory to `out`: one step, which replaces an empty `out`."""
    try:
        tmp.rename(out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise MixexportError(f"{out}: something was written into it while the checkpoint was being written; "
                                 f"it was left as it was (choose another directory)") from None
        raise os_error(exc, out) from None


def _checked_out(out: Path) -> Path:
    """`out` if a checkpoint may be written there, else a MixexportError saying why not."""
    try:
        here = Path.cwd().resolve()
        real = out.resolve()
        if real == here or real in here.parents:
            raise MixexportError(f"{out} is the current directory or one of its parents; name a new directory "
                                 f"(e.g. mixexport init tiny-model)")
        if out.is_symlink():
            raise MixexportError(f"{out} is a symlink; name a new directory, not a link")
        for ancestor in out.parents:  # the nearest existing ancestor must be a directory
            if os.path.lexists(ancestor):
                if not ancestor.is_dir():
                    raise MixexportError(f"{ancestor} is a file, not a directory; {out} cannot be created in it")
                break
        if os.path.lexists(out):
            if not out.is_dir():
                raise MixexportError(f"{out} already exists and is not a directory; choose another name")
            if any(out.iterdir()):
                raise MixexportError(f"{out} already exists and is not empty; choose another directory or remove it")
    except OSError as exc:
        raise os_error(exc, out) from None
    return out


def _make_parents(parent: Path) -> list[Path]:
    """Create `parent` and its missing ancestors; returns those created, deepest first."""
    missing = []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    try:
        for path in reversed(missing):
            path.mkdir()
    except OSError as exc:
        _remove_dirs([p for p in missing if p.exists()])
        raise os_error(exc) from None
    return missing


def _remove_dirs(paths: list[Path]) -> None:
    """Remove directories this run created (deepest first), if they are still empty."""
    for path in paths:
        try:
            path.rmdir()
        except OSError:
            return  # not empty any more: someone else's files are in it now


def _check_free_space(parent: Path, needed: int) -> None:
    free = shutil.disk_usage(parent).free
    needed += 1024**2  # config.json, headers and the index
    if free < needed:
        raise MixexportError(f"{parent}: not enough free space for the checkpoint: it needs {needed} bytes "
                             f"({format_bytes(needed)}), {free} bytes ({format_bytes(free)}) are available")


def _pack(shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_size: int) -> list[list[str]]:
    """Greedy packing in file order, as save_pretrained does: a tensor larger than the limit gets
    a shard of its own."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    return shards


def _write_into(tmp: Path, config: MixtralConfig, shapes: dict[str, tuple[int, ...]], shards: list[list[str]],
                code: str, seed: int, total: int, progress: Callable[[str], None] | None) -> None:
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    write_tokenizer(tmp, config)
    file_names = ([SINGLE_FILE] if len(shards) == 1 else
                  [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    itemsize = torch_dtype(config.dtype).itemsize
    weight_map = {}
    written, start = 0, time.perf_counter()
    for k, (file_name, shard) in enumerate(zip(file_names, shards)):
        entries = [(name, code, shapes[name],
                    lambda name=name: random_tensor(config, name, shapes[name], seed)) for name in shard]
        write_safetensors(tmp / file_name, entries)
        weight_map.update({name: file_name for name in shard})
        shard_bytes = sum(math.prod(shapes[name]) * itemsize for name in shard)
        written += shard_bytes
        if progress:
            progress(f"wrote {file_name} ({len(shard)} tensors, {format_bytes(shard_bytes)}; shard {k + 1} of "
                     f"{len(shards)}, {format_bytes(written)} of {format_bytes(total)} in "
                     f"{time.perf_counter() - start:.1f}s)")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
