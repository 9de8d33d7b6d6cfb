"""Save a lowered model: its weights streamed into one external data file, then the graph.

Why not `ir.save(model, external_data=...)`: its parallel writer puts tensors at their offsets in
any order, so the file can only be hashed by reading it back afterwards -- for Mixtral 8x7B a
second 93 GB pass over the disk. Here the weights are written strictly in order, and hashed from
memory as they are written:

    checkpoint ──read, convert, re-lay── chunk ──▶ ordered queue ──▶ write ──────▶ fsync
                (2-8 threads, ahead of the writer,          └─▶ sha256 (beside the write)
                 at most MAX_IN_FLIGHT bytes)

A chunk is one expert of an expert stack, or one whole other tensor, so memory stays bounded by
the in-flight budget plus two chunks whatever the model's size. Each chunk is hashed by one more
thread while it is written. Reading, converting, writing and hashing all release the GIL, so
the threads overlap.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

from mixexport.artifact.manifest import file_entry
from mixexport.capture import StackedLazyTensor, contiguous
from mixexport.errors import InternalError

ONNX_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
INLINE_BYTES = 256  # tensors up to this size stay inside the ONNX file (as ir.save does)
MAX_IN_FLIGHT = 512 * 1024**2  # bytes prepared ahead of the writer
# Reading, hashing and converting scale with cores; the writer and its hash are one stream each.
PREPARE_THREADS = min(8, max(2, os.cpu_count() or 2))
PROGRESS_SECONDS = 15.0

Chunk = tuple[int, Callable[[], "np.ndarray | bytes"]]  # (byte count, make the bytes)


def _chunks(tensor: ir.TensorProtocol) -> Iterator[Chunk]:
    if isinstance(tensor, StackedLazyTensor):
        each = tensor.nbytes // tensor.count
        for e in range(tensor.count):
            yield each, lambda e=e: tensor.slice(e)
    elif tensor.dtype.bitwidth % 8 == 0:
        yield tensor.nbytes, lambda: contiguous(tensor.numpy())  # its own buffer, no bytes copy
    else:  # sub-byte types: only tobytes() packs them
        yield tensor.nbytes, tensor.tobytes


def _as_bytes(data: "np.ndarray | bytes") -> memoryview:
    return memoryview(data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else data)


def save_model(model: ir.Model, folder: Path, root: Path, label: str,
               progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Write `folder/model.onnx` and its weights `folder/model.onnx.data`, both fsynced.

    Initializers larger than INLINE_BYTES go to the data file, densely, in graph order; the
    model's initializers are replaced by references to it (the model is the build's own clone).

    Args:
        model: the lowered model; its initializers may be lazy.
        folder: where the two files go.
        root: the artifact root, which the manifest paths are relative to.
        label: names this save in progress lines (the target).
        progress: receives a line about every PROGRESS_SECONDS while weights are written.

    Returns:
        the manifest entries of the ONNX file and the data file (the latter hashed while written).
    """
    data_path = folder / DATA_FILE
    external = [value for graph in model.graphs() for value in graph.initializers.values()
                if value.const_value is not None and value.const_value.nbytes > INLINE_BYTES]
    offsets = list(itertools.accumulate((value.const_value.nbytes for value in external), initial=0))
    total = offsets.pop()
    digest = hashlib.sha256()
    written, start, last_report = 0, time.perf_counter(), time.perf_counter()
    with (open(data_path, "wb") as f, ThreadPoolExecutor(PREPARE_THREADS) as pool,
          ThreadPoolExecutor(1) as hasher):
        pending: deque[tuple[int, Future]] = deque()
        in_flight = 0
        hashed: Future | None = None  # the sha256 of the chunk last written, running beside the next write

        def write_next() -> None:
            nonlocal in_flight, written, last_report, hashed
            nbytes, future = pending.popleft()
            data = _as_bytes(future.result())
            if data.nbytes != nbytes:
                raise InternalError(f"{label}: a weight chunk came out {data.nbytes} bytes, expected {nbytes}")
            if hashed is not None:
                hashed.result()  # chunks are hashed in file order, one at a time
            hashed = hasher.submit(digest.update, data)
            f.write(data)
            in_flight -= nbytes
            written += nbytes
            if time.perf_counter() - last_report >= PROGRESS_SECONDS:
                last_report = time.perf_counter()
                progress(f"{label}: {written / 1e9:.1f} of {total / 1e9:.1f} GB written "
                         f"({written / 1e6 / (last_report - start):.0f} MB/s)")

        for value in external:
            for nbytes, make in _chunks(value.const_value):
                while pending and in_flight + nbytes > MAX_IN_FLIGHT:
                    write_next()
                pending.append((nbytes, pool.submit(make)))
                in_flight += nbytes
        while pending:
            write_next()
        if hashed is not None:
            hashed.result()
        f.flush()
        os.fsync(f.fileno())
    for value, offset in zip(external, offsets):
        tensor = value.const_value
        value.const_value = ir.ExternalTensor(DATA_FILE, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=value.name, base_dir=folder)
    onnx_path = folder / ONNX_FILE
    ir.save(model, onnx_path)
    with open(onnx_path, "rb+") as f:
        os.fsync(f.fileno())
    return [file_entry(onnx_path, root), file_entry(data_path, root, sha256=digest.hexdigest())]
