"""Low-level safetensors file access: header parsing with precise errors, reads, a streaming writer.

The header is parsed here rather than by `safetensors.safe_open` so that a truncated or corrupt
file is reported with its name, what was expected and what was found, before any tensor is read.
Tensors are read with plain positioned reads rather than a memory map: mapped pages of a
checkpoint read end to end would stay resident (and count against the process) until unmapped,
which for Mixtral 8x7B is the whole 93 GB.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from mixexport.errors import InternalError, MixexportError

# safetensors dtype code <-> torch dtype, for the dtypes a Mixtral checkpoint may hold.
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool}
ST_CODES = {dtype: code for code, dtype in ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from a safetensors header."""

    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte offset of the data in the file


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file.

    Raises:
        MixexportError: naming the file, for a missing, truncated or corrupt file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MixexportError(f"{path}: corrupt safetensors file ({size} bytes, too short for a header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise MixexportError(
                    f"{path}: truncated or corrupt safetensors file: header claims {header_len} bytes, "
                    f"file has {size} bytes")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise MixexportError(f"{path}: file not found") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MixexportError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise MixexportError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = 0 <= begin <= end and all(dim >= 0 for dim in shape)
            if valid and dtype in ST_DTYPES:
                # What safetensors checks when it opens the file: the byte range fits shape x dtype.
                valid = end - begin == math.prod(shape) * ST_DTYPES[dtype].itemsize
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise MixexportError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}")
        if end > data_size:
            raise MixexportError(
                f"{path}: truncated file: tensor {name!r} needs bytes up to {8 + header_len + end}, "
                f"file has {size} bytes (re-download or re-convert this shard)")
        infos[name] = TensorInfo(path, dtype, shape, end - begin, 8 + header_len + begin)
    return infos


def read_tensor(info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor, or into `out` (contiguous, same byte count)."""
    if out is None:
        # torch.empty, not bytearray: no zero-fill pass over memory that is overwritten at once.
        flat = torch.empty(info.nbytes, dtype=torch.uint8)
    elif out.is_contiguous() and out.numel() * out.element_size() == info.nbytes:
        flat = out.view(-1).view(torch.uint8)
    else:
        raise InternalError(f"cannot read {info.nbytes} bytes into a {tuple(out.shape)} {out.dtype} tensor")
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        if info.nbytes and f.readinto(flat.numpy()) != info.nbytes:
            raise MixexportError(f"{info.file}: truncated while reading a tensor at byte {info.offset}")
    return flat.view(ST_DTYPES[info.dtype]).reshape(info.shape)


def write_safetensors(path: Path, tensors: Iterable[tuple[str, str, tuple[int, ...], "callable"]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file holding only one tensor in memory at a time.

    Args:
        path: output file.
        tensors: (name, safetensors dtype code, shape, make) where `make()` returns the tensor.
            The header is written first from the declared shapes, then each tensor is made and
            streamed to disk, so peak memory is one tensor, not one shard.
        metadata: the header's `__metadata__` (Hugging Face expects {"format": "pt"}).
    """
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, code, shape, _ in tensors:
        nbytes = ST_DTYPES[code].itemsize
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, code, shape, make in tensors:
            _write_tensor(f, make(), name, code, shape)


def _write_tensor(f: BinaryIO, tensor: torch.Tensor, name: str, code: str, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != ST_DTYPES[code]:
        raise InternalError(f"tensor {name}: made {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {code}")
    f.write(tensor.contiguous().view(torch.uint8).numpy().data)
