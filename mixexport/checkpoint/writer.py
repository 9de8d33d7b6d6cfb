"""Write random-weight checkpoints in the exact Hugging Face layout (`mixexport init`).

Every tensor is drawn from its own generator, seeded from (seed, tensor name): the weights do not
depend on sharding or write order, so a preset + seed regenerates the same checkpoint anywhere.
Shards are streamed tensor by tensor, so writing Mixtral 8x22B's shapes needs one tensor's memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch

from mixexport.checkpoint import names
from mixexport.checkpoint.config import MixtralConfig
from mixexport.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from mixexport.checkpoint.safetensors_io import ST_CODES, write_safetensors
from mixexport.dtypes import torch_dtype
from mixexport.errors import MixexportError

DEFAULT_SHARD_BYTES = 5 * 1024**3


def parse_size(text: str | int) -> int:
    """'500MB', '2GB', '1.5GiB' or a byte count -> bytes (Hugging Face's `max_shard_size` spelling)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    raw = text.strip().upper()
    number = raw.rstrip("KMGTIB")
    try:
        value = float(number) * units[raw[len(number):]]
    except (ValueError, KeyError):
        raise MixexportError(f"--max-shard-size {text!r}: use a byte count or a size such as 500MB or 2GB") from None
    if value < 1:
        raise MixexportError(f"--max-shard-size {text!r} must be positive")
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
    """Write `config.json` and random safetensors shards (+ index when sharded) into `out`.

    Args:
        out: a directory that does not exist yet or is empty.
        config: the model shapes.
        seed: weights seed; the same config and seed always give the same weights.
        max_shard_size: bytes per shard, as `save_pretrained(max_shard_size=...)`.
        progress: called with one line per shard written.

    Returns:
        the checkpoint directory.
    """
    out = Path(out).resolve()  # "." or "x/.." have no usable name for the sibling .partial dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MixexportError(f"{out} already exists and is not empty; choose another directory or remove it")
    code = ST_CODES[torch_dtype(config.dtype)]
    itemsize = torch_dtype(config.dtype).itemsize
    shapes = names.expected_shapes(config)

    # Greedy packing in file order, as save_pretrained does: a tensor larger than the limit gets
    # a shard of its own.
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    file_names = ([SINGLE_FILE] if len(shards) == 1 else
                  [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map = {}
    for file_name, shard in zip(file_names, shards):
        entries = [(name, code, shapes[name],
                    lambda name=name: random_tensor(config, name, shapes[name], seed)) for name in shard]
        write_safetensors(tmp / file_name, entries)
        weight_map.update({name: file_name for name in shard})
        if progress:
            progress(f"wrote {file_name} ({len(shard)} tensors)")
    if len(shards) > 1:
        total = sum(math.prod(s) * itemsize for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
