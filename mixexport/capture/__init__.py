"""Capture: the decoder traced into ONNX without its weights in memory (`capture.export`).

Its output, which the later stages consume, is an `onnx_ir.Model` whose initializers are lazy:
`onnx_ir.LazyTensor` or, for expert stacks, `StackedLazyTensor` (streamed one expert at a time);
`materialize` and `contiguous` lay such data out. Those are this package's public API; the rest
is its own.
"""

from mixexport.capture.lazy_weights import StackedLazyTensor, contiguous, materialize

__all__ = ["StackedLazyTensor", "contiguous", "materialize"]
