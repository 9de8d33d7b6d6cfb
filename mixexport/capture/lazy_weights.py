"""Lazy initializer values that stream from the checkpoint when the model is saved.

Expert stacks are the large tensors (Mixtral 8x7B: 1.9 GB per layer for gate/up in fp16).
`StackedLazyTensor` never builds one: `ir.save` calls its `tofile`, which reads, converts and
writes one expert at a time, so export memory is bounded by one expert, not one layer.
"""

from __future__ import annotations

from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 as ml_dtypes.bfloat16 (numpy has none)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


class StackedLazyTensor(ir.LazyTensor):
    """A lazy [E, ...] tensor defined by its expert slices `part(e)` (numpy arrays).

    `numpy()`/`tobytes()` build the whole stack (small models, tests); `tofile()`, which `ir.save`
    uses for external data, writes it slice by slice.
    """

    def __init__(self, part: Callable[[int], np.ndarray], count: int, dtype: ir.DataType, shape: ir.Shape,
                 name: str | None = None) -> None:
        self.part, self.count = part, count
        super().__init__(lambda: ir.tensor(np.stack([part(e) for e in range(count)])), dtype=dtype, shape=shape,
                         name=name)

    def tofile(self, file) -> None:
        for e in range(self.count):
            array = np.ascontiguousarray(self.part(e))
            file.write(array.view(np.uint8).data)
