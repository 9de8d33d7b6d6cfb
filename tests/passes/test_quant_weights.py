"""Quantized expert initializers: lazy (nothing read until written, one expert per slice), and
exactly the scheme's bytes of the weight in the model dtype, bfloat16 included."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from mixexport.capture import StackedLazyTensor
from mixexport.passes.quant_weights import quantized_expert, quantized_stack
from mixexport.quant import QuantScheme, quantize

E, N, K = 3, 8, 64


def _stack(dtype: ir.DataType, reads: list[int]):
    rng = np.random.default_rng(0)
    full = rng.standard_normal((E, N, K)).astype(np.float32)  # the "checkpoint": float32

    def part(e):
        reads.append(e)
        return full[e]

    tensor = StackedLazyTensor(part, E, dtype, ir.Shape((E, N, K)), name="layers.0.moe.w")
    value = ir.Value(name="layers.0.moe.w", shape=tensor.shape, type=ir.TensorType(dtype), const_value=tensor)
    return value, full


@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(4, 32)])
@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT16, ir.DataType.BFLOAT16])
def test_stack_streams_and_matches_scheme(scheme, dtype):
    reads: list[int] = []
    source, full = _stack(dtype, reads)
    graph = ir.Graph([], [], nodes=[])
    stored, scales = quantized_stack(graph, source, "layers.0.moe.w", scheme)
    assert reads == []  # registering reads nothing
    q1 = stored.const_value.slice(1)
    assert reads == [1]  # one expert per slice
    torch_dtype = torch.float16 if dtype == ir.DataType.FLOAT16 else torch.bfloat16
    expected_q, expected_s = quantize(torch.from_numpy(full[1]).to(torch_dtype), scheme, torch_dtype)
    np.testing.assert_array_equal(q1, expected_q.numpy())
    s1 = scales.const_value.slice(1)
    assert s1.dtype == dtype.numpy()
    np.testing.assert_array_equal(s1.view(np.int16), expected_s.view(torch.int16).numpy())
    assert tuple(stored.shape) == (E, N, K * scheme.bits // 8) and stored.dtype == ir.DataType.UINT8


def test_expert_int4_is_onnx_uint4():
    reads: list[int] = []
    source, full = _stack(ir.DataType.FLOAT, reads)
    graph = ir.Graph([], [], nodes=[])
    scheme = QuantScheme(4, 32)
    stored, _ = quantized_expert(graph, source, 2, "layers.0.moe.experts.2.w", scheme)
    assert reads == [] and stored.dtype == ir.DataType.UINT4 and tuple(stored.shape) == (N, K)
    expected, _ = quantize(torch.from_numpy(full[2]), scheme, torch.float32)
    assert stored.const_value.tobytes() == expected.numpy().tobytes()  # ONNX's packing is the scheme's
    assert set(reads) == {2}
