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
from mixexport.safe_io import cut, open_regular, os_error, parse_json_object

# safetensors dtype code <-> torch dtype, for the dtypes a Mixtral checkpoint may hold.
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool}
ST_CODES = {dtype: code for code, dtype in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # bytes; safetensors' own limit
# Bounds on a header's shapes, checked before any arithmetic on them: far above any model's
# tensors (the largest dimension of a Mixtral is its vocabulary, 32768), low enough that the
# byte counts computed from them stay small integers.
MAX_RANK = 8
MAX_DIM = 2**40


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

    Every entry is checked for type and range before any arithmetic on it: dtype a string,
    shape a list of at most MAX_RANK integers in [0, MAX_DIM], data_offsets two integers with
    begin <= end <= the data size, and end - begin equal to the shape's byte count.

    Raises:
        MixexportError: naming the file (and the tensor), for a missing, unreadable, truncated or
            corrupt file.
    """
    f, size = open_regular(path)
    try:
        with f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MixexportError(f"{path}: corrupt safetensors file ({size} bytes, too short for a header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER or 8 + header_len > size:
                raise MixexportError(
                    f"{path}: truncated or corrupt safetensors file: header claims {header_len} bytes, "
                    f"file has {size} bytes")
            raw = f.read(header_len)
    except OSError as exc:
        raise os_error(exc, path) from None
    if len(raw) != header_len:
        raise MixexportError(f"{path}: truncated while reading its header (the file shrank?)")
    header = parse_json_object(raw, f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise MixexportError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings, "
                             f"got {cut(repr(metadata))}")
    data_size = size - 8 - header_len
    infos = {}
    for name, entry in header.items():
        dtype, shape, nbytes, begin = _check_entry(path, name, entry)
        if begin + nbytes > data_size:
            raise MixexportError(
                f"{path}: truncated file: tensor {cut(repr(name))} needs bytes up to "
                f"{8 + header_len + begin + nbytes}, file has {size} bytes (re-download or re-convert this shard)")
        infos[name] = TensorInfo(path, dtype, shape, nbytes, 8 + header_len + begin)
    return infos


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(path: Path, name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, nbytes, begin) of one header entry, or a MixexportError saying what is wrong."""
    def corrupt(why: str) -> MixexportError:
        return MixexportError(f"{path}: corrupt safetensors header entry for tensor {cut(repr(name))}: {why}")

    if not isinstance(entry, dict):
        raise corrupt(f"expected an object with dtype, shape and data_offsets, got {cut(repr(entry))}")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise corrupt(f"missing {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise corrupt(f"dtype must be a string, got {cut(repr(dtype))}")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK
            and all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        raise corrupt(f"shape must be a list of at most {MAX_RANK} integers in [0, {MAX_DIM}], got {cut(repr(shape))}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"data_offsets must be two integers 0 <= begin <= end, got {cut(repr(offsets))}")
    begin, end = offsets
    if dtype in ST_DTYPES:
        # What safetensors checks when it opens the file: the byte range fits shape x dtype.
        expected = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if end - begin != expected:
            raise corrupt(f"data_offsets {offsets} cover {end - begin} bytes, shape {shape} of {dtype} needs "
                          f"{expected}")
    return dtype, tuple(shape), end - begin, begin


def read_tensor(info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor, or into `out` (contiguous, same byte count).

    The file is opened again for each read, by the same rule as for its header (a regular file):
    a shard replaced by something else since the header was read is refused, not read.
    """
    if out is None:
        # torch.empty, not bytearray: no zero-fill pass over memory that is overwritten at once.
        flat = torch.empty(info.nbytes, dtype=torch.uint8)
    elif out.is_contiguous() and out.numel() * out.element_size() == info.nbytes:
        flat = out.view(-1).view(torch.uint8)
    else:
        raise InternalError(f"cannot read {info.nbytes} bytes into a {tuple(out.shape)} {out.dtype} tensor")
    f, _ = open_regular(info.file)
    try:
        with f:
            f.seek(info.offset)
            if info.nbytes and f.readinto(flat.numpy()) != info.nbytes:
                raise MixexportError(f"{info.file}: truncated while reading a tensor at byte {info.offset}")
    except OSError as exc:
        raise os_error(exc, info.file) from None
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
