"""Lower `mixexport.MoE` to standard ONNX ops only: the artifact that runs on any runtime, and
the no-plugin TensorRT baseline.

The form is `passes/sparse_moe.py`'s: routing, then one `If` per expert that runs only when some
token chose it, on that expert's own (pre-transposed) weights.

Quantized experts (`mixexport.quant`) stay standard ONNX: each expert weight is stored as the
scheme stores it (uint8 for int8; ONNX's uint4 for int4, whose packing is the scheme's), and a
`DequantizeLinear` with blocked quantization (opset 21: axis 1, block_size G, the scheme's zero
point 2**(bits-1), scales [N, K/G] in the model dtype) feeds the same expert math, which then
multiplies by the dequantized [N, K] weight with `Gemm(transB=1)`.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import onnx_ir as ir

from mixexport.passes.moe_nodes import MoELowering, MoEMatch
from mixexport.passes.quant_weights import quantized_expert, quantized_shapes
from mixexport.passes.sparse_moe import lower_sparse, transposed_matmul
from mixexport.quant import QuantScheme


def _zero_point(graph: ir.Graph, m: MoEMatch, weight: ir.Value, quant: QuantScheme, what: str) -> ir.Value:
    """One layer's zero points for every expert's `weight` [N, K]: the scheme's offset, per scale."""
    shape = quantized_shapes(tuple(weight.shape)[1:], quant)[1]
    name = m.name(f"{what}.zero_point")
    storage = np.uint8 if quant.bits == 8 else ml_dtypes.uint4
    tensor = ir.tensor(np.full(shape, quant.offset, storage), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _dequantized_matmul(quant: QuantScheme, zero_points: dict[str, ir.Value], tape: ir.tape.Tape, graph: ir.Graph,
                        m: MoEMatch, e: int, x: ir.Value, weight: ir.Value, what: str) -> ir.Value:
    """x [n_e, K] @ expert e's quantized `weight` [N, K] transposed, through DequantizeLinear: [n_e, N]."""
    k = weight.shape[2]
    stored, scales = quantized_expert(graph, weight, e, m.name(f"experts.{e}.{what}"), quant)
    w = tape.op("DequantizeLinear", [stored, scales, zero_points[what]],
                {"axis": 1, "block_size": quant.group(k)})  # [N, K] in the model dtype
    return tape.op("Gemm", [x, w], {"transB": 1})


def lower_one(graph: ir.Graph, m: MoEMatch, quant: QuantScheme | None) -> None:
    matmul = transposed_matmul
    if quant is not None:
        zero_points = {what: _zero_point(graph, m, w, quant, what)
                       for what, w in (("w_gate_up", m.w_gate_up), ("w_down", m.w_down))}
        matmul = functools.partial(_dequantized_matmul, quant, zero_points)
    lower_sparse(graph, m, matmul, "portable")


class LowerMoEToPortable(MoELowering):
    """Replace every `mixexport.MoE` node with standard ONNX ops (sparse, one If per expert)."""

    quant_opset = 21  # DequantizeLinear with blocked quantization and uint4
    lower_one = staticmethod(lower_one)
