"""Lazy initializer values that stream from the checkpoint when the model is saved.

Expert stacks are the large tensors (Mixtral 8x7B: 1.9 GB per layer for gate/up in fp16).
`StackedLazyTensor` never builds one: the build's writer (`mixexport.artifact.save`) takes it
expert by expert, and so does its `tofile` (what `ir.save` calls), so export memory is bounded by
a few experts, not one layer.
"""

from __future__ import annotations

from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch


_SAME_SIZE_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


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


class StackedLazyTensor(ir.LazyTensor):
    """A lazy [E, ...] tensor defined by its expert slices `part(e)` (numpy arrays).

    `numpy()`/`tobytes()` build the whole stack (small models, tests); `tofile()`, which `ir.save`
    uses for external data, writes it slice by slice, as the build's writer does.
    """

    def __init__(self, part: Callable[[int], np.ndarray], count: int, dtype: ir.DataType, shape: ir.Shape,
                 name: str | None = None) -> None:
        self.part, self.count = part, count
        super().__init__(lambda: ir.tensor(np.stack([part(e) for e in range(count)])), dtype=dtype, shape=shape,
                         name=name)

    def tofile(self, file) -> None:
        for e in range(self.count):
            file.write(contiguous(self.part(e)).view(np.uint8).data)
