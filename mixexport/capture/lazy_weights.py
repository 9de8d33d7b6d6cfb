"""Lazy initializer values that stream from the checkpoint when the model is saved.

Expert stacks are the large tensors (Mixtral 8x7B: 1.9 GB per layer for gate/up in fp16).
`StackedLazyTensor` never builds one: the build's writer (`mixexport.artifact.save`) takes it
expert by expert, and so does its `tofile` (what `ir.save` calls), so export memory is bounded by
a few experts, not one layer.

An expert slice stays in the checkpoint's dtype and layout until it is written: re-layouts
(transposes, the ort interleave) are numpy views on it, and `materialize` converts and lays out
in one copy. For Mixtral 8x7B that is one pass over each expert's bytes instead of three (a
convert, a re-layout, and the concatenation of gate and up), and fewer fresh buffers to fault in.
"""

from __future__ import annotations

import math
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from mixexport.dtypes import DTYPES
from mixexport.errors import InternalError

_SAME_SIZE_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_TORCH_DTYPES = {np.dtype(np.float64): torch.float64, **{d.numpy: d.torch for d in DTYPES.values()}}


def contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a (transposed, interleaved...) view, made by torch's parallel copy.

    A re-layout is a pure byte shuffle, so the data is viewed as same-size integers (numpy's
    ml_dtypes bfloat16 included) and copied by torch, about twice as fast as numpy's strided copy
    for a transpose on 2 cores.
    """
    if array.flags.c_contiguous:
        return array
    as_int = array.view(_SAME_SIZE_INT[array.itemsize])
    return torch.from_numpy(as_int).contiguous().numpy().view(array.dtype)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 as ml_dtypes.bfloat16 (numpy has none)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def materialize(array: np.ndarray, dtype: ir.DataType, shape: tuple[int, ...]) -> np.ndarray:
    """`array` (any layout, any float dtype) as a C-contiguous `dtype` array reshaped to `shape`.

    One copy converts and re-lays at once (none when the array already is both); the elements are
    taken in the C order of `array`'s own shape, so a transform may return any view whose
    flattening is the result (the ort interleave returns [I, 2, H] for [2I, H]).
    """
    if array.size != math.prod(shape):
        raise InternalError(f"{array.size} elements of shape {array.shape} cannot be laid out as {tuple(shape)}")
    target = dtype.numpy()
    if array.dtype == target:
        return contiguous(array).reshape(shape)
    source = array.view(np.int16) if array.dtype == ml_dtypes.bfloat16 else array
    source = torch.from_numpy(source).view(_TORCH_DTYPES[array.dtype])
    out = torch.empty(array.shape, dtype=_TORCH_DTYPES[np.dtype(target)])
    out.copy_(source)
    return to_numpy(out).reshape(shape)


class StackedLazyTensor(ir.LazyTensor):
    """A lazy [E, ...] tensor defined by its expert slices.

    `part(e)` gives expert e's slice as a numpy array in any layout and float dtype whose C-order
    elements are the slice's (see `materialize`); `slice(e)` is that slice in this tensor's dtype
    and shape. `numpy()`/`tobytes()` build the whole stack (small models, tests); `tofile()`, which
    `ir.save` uses for external data, writes it slice by slice, as the build's writer does.
    """

    def __init__(self, part: Callable[[int], np.ndarray], count: int, dtype: ir.DataType, shape: ir.Shape,
                 name: str | None = None) -> None:
        self.part, self.count = part, count
        super().__init__(lambda: ir.tensor(np.stack([self.slice(e) for e in range(count)])), dtype=dtype,
                         shape=shape, name=name)

    def slice(self, e: int) -> np.ndarray:
        return materialize(self.part(e), self.dtype, tuple(self.shape)[1:])

    def tofile(self, file) -> None:
        for e in range(self.count):
            file.write(self.slice(e).view(np.uint8).data)
