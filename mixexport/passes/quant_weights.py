"""Quantized expert initializers, computed lazily while the model is saved (`mixexport.quant`).

A lowering that serves quantized experts registers, in place of an expert weight, two lazy
initializers: the stored bytes (uint8, or uint4 where the graph wants ONNX's 4-bit type) and the
scales in the model dtype. Both quantize inside the lazy tensor's function, expert by expert for
a streamed stack (`StackedLazyTensor`), so a quantized export holds no more weights in memory
than a full-precision one: one expert slice at a time per writer thread.

What is quantized is the weight in the model dtype (the checkpoint's slice converted first), the
same tensor the validation reference quantizes, so `dequantize(quantize(w))` there is exactly what
the artifact stores. Quantizing is not cheap: the least-error scale search scores several
candidate scales per group (about 1.5 s a call for one 8x7B expert at int8, one thread). So each
expert is quantized once, when its codes are written, and its scales (1/32 of the fp16 weight at
int4-g32, one per row at int8) are kept until the scale tensor is written; a scale tensor written
before its codes quantizes again rather than hold the codes.
"""

from __future__ import annotations

from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from mixexport.capture import StackedLazyTensor, materialize
from mixexport.capture.lazy_weights import to_numpy
from mixexport.dtypes import DTYPES
from mixexport.quant import QuantScheme, quantize

_TORCH_OF = {ir.DataType.from_numpy(d.numpy): d.torch for d in DTYPES.values()}
Relayout = Callable[[np.ndarray], np.ndarray]


def quantized_shapes(shape: tuple[int, ...], scheme: QuantScheme) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stored bytes, scales) shapes of a weight [..., N, K]: [..., N, K*bits/8] and [..., N, K/G]."""
    *lead, n, k = shape
    return (*lead, n, k * scheme.bits // 8), (*lead, n, k // scheme.group(k))


def _weight(array: np.ndarray, dtype: ir.DataType, shape: tuple[int, ...]) -> torch.Tensor:
    """The weight in the model dtype as a torch tensor (one converting copy)."""
    out = materialize(array, dtype, shape)
    if out.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(out)


def _register(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def quantized_stack(graph: ir.Graph, source: ir.Value, name: str, scheme: QuantScheme,
                    relayout: Relayout = lambda w: w, row_scales_2d: bool = False) -> tuple[ir.Value, ir.Value]:
    """Register the quantized form of an expert stack [E, N, K] as two lazy initializers.

    Args:
        graph: graph to register them in.
        source: the [E, N, K] expert initializer (streamed or not).
        name: prefix of the new initializers' names (`<name>.qweight`, `<name>.scales`).
        scheme: the quantization scheme.
        relayout: a reordering of each expert's N rows (the ort interleave): per-row quantization
            commutes with it, so it is applied to the weight before quantizing. It gets and returns
            a view of [1, N, K] whose C-order flattening is the re-laid [1, N, K].
        row_scales_2d: give per-row scales (int8) the shape [E, N], as QMoE wants them without
            `block_size` (a group scheme keeps [E, N, K/G], even where K/G is 1).

    Returns:
        (stored uint8 [E, N, K*bits/8], scales [E, N, K/G] in the model dtype, or [E, N]).
    """
    src = source.const_value
    e, n, k = source.shape
    dtype = src.dtype
    q_shape, s_shape = quantized_shapes((e, n, k), scheme)
    if row_scales_2d and scheme.group_size is None:
        s_shape = s_shape[:-1]

    def quantized(expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = src.part(expert)[None] if isinstance(src, StackedLazyTensor) else src.numpy()[expert:expert + 1]
        return quantize(_weight(relayout(part), dtype, (n, k)), scheme, _TORCH_OF[dtype])

    kept: dict[int, torch.Tensor] = {}  # an expert's scales, from the call that wrote its codes

    def codes(expert: int) -> np.ndarray:
        q, kept[expert] = quantized(expert)
        return q.numpy()

    def expert_scales(expert: int) -> np.ndarray:
        found = kept.pop(expert, None)
        return to_numpy(quantized(expert)[1] if found is None else found)

    stored = StackedLazyTensor(codes, e, ir.DataType.UINT8, ir.Shape(q_shape), name=f"{name}.qweight")
    scales = StackedLazyTensor(expert_scales, e, dtype, ir.Shape(s_shape), name=f"{name}.scales")
    return _register(graph, stored.name, stored), _register(graph, scales.name, scales)


def quantized_expert(graph: ir.Graph, source: ir.Value, expert: int, name: str,
                     scheme: QuantScheme) -> tuple[ir.Value, ir.Value]:
    """Register one expert's quantized weight [N, K] of an [E, N, K] stack, lazily, in ONNX's own
    storage types (uint8 for int8, uint4 for int4: the packing `mixexport.quant` uses is ONNX's).

    Returns:
        (stored [N, K] uint8 or uint4, scales [N, K/G] in the model dtype).
    """
    src = source.const_value
    _, n, k = source.shape
    dtype = src.dtype
    storage = ir.DataType.UINT8 if scheme.bits == 8 else ir.DataType.UINT4

    def quantized() -> tuple[torch.Tensor, torch.Tensor]:
        part = src.part(expert) if isinstance(src, StackedLazyTensor) else src.numpy()[expert]
        return quantize(_weight(part, dtype, (n, k)), scheme, _TORCH_OF[dtype])

    kept: list[torch.Tensor] = []  # the scales, from the call that wrote the codes

    def stored() -> ir.TensorProtocol:
        codes, found = quantized()
        kept[:] = [found]
        data = codes.numpy()
        if scheme.bits == 8:
            return ir.tensor(data, dtype=storage)
        return ir.PackedTensor(data, storage, shape=ir.Shape((n, k)))

    s_shape = quantized_shapes((n, k), scheme)[1]
    q = ir.LazyTensor(stored, dtype=storage, shape=ir.Shape((n, k)), name=f"{name}.qweight")

    def expert_scales() -> ir.TensorProtocol:
        found = kept.pop() if kept else quantized()[1]
        return ir.tensor(to_numpy(found))

    s = ir.LazyTensor(expert_scales, dtype=dtype, shape=ir.Shape(s_shape), name=f"{name}.scales")
    return _register(graph, q.name, q), _register(graph, s.name, s)
