"""Lower `mixexport.MoE` to standard ONNX ops only: the artifact that runs on any runtime, and
the no-plugin TensorRT baseline.

Routing is Softmax + TopK (ties go to the lower index by the ONNX spec). The experts are then
sparse, as the op is: one `If` per expert runs only when some token chose it, gathers just those
tokens, runs the expert's two MatMuls on its own weights and scatters the weighted rows back. A
decode step therefore reads K experts' weights, not E; and because each expert's weights are a
plain initializer, a runtime can pre-pack them for its GEMM (onnxruntime does) instead of
gathering weight slices at run time.

Quantized experts (`mixexport.quant`) stay standard ONNX: each expert weight is stored as the
scheme stores it (uint8 for int8; ONNX's uint4 for int4, whose packing is the scheme's), and a
`DequantizeLinear` with blocked quantization (opset 21: axis 1, block_size G, the scheme's zero
point 2**(bits-1), scales [N, K/G] in the model dtype) feeds the same expert math, which then
multiplies by the dequantized [N, K] weight with `Gemm(transB=1)`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from mixexport.passes.base import expert_initializer
from mixexport.passes.moe_nodes import MoELowering, MoEMatch, replace_moe
from mixexport.passes.quant_weights import quantized_expert, quantized_shapes
from mixexport.quant import QuantScheme

FLOAT = ir.DataType.FLOAT


def _const(tape: ir.tape.Tape, array: np.ndarray, name: str) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(array, name=name)}, name=name)


def _name_nodes(nodes, prefix: str) -> None:
    """Name nodes and their outputs after the layer: ONNX wants value names unique across the
    main graph and every If branch, which per-graph automatic names are not."""
    for n, node in enumerate(nodes):
        node.name = node.name or f"{prefix}/{node.op_type}_{n}"
        for k, value in enumerate(node.outputs):
            value.name = f"{node.name}:{k}"


def _zero_point(graph: ir.Graph, m: MoEMatch, weight: ir.Value, quant: QuantScheme, what: str) -> ir.Value:
    """One layer's zero points for every expert's `weight` [N, K]: the scheme's offset, per scale."""
    shape = quantized_shapes(tuple(weight.shape)[1:], quant)[1]
    name = m.name(f"{what}.zero_point")
    storage = np.uint8 if quant.bits == 8 else ml_dtypes.uint4
    tensor = ir.tensor(np.full(shape, quant.offset, storage), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _expert_matmul(tape: ir.tape.Tape, graph: ir.Graph, m: MoEMatch, e: int, x: ir.Value, weight: ir.Value,
                   what: str, quant: QuantScheme | None, zero_points: dict[str, ir.Value]) -> ir.Value:
    """x [n_e, K] @ expert e's `weight` [N, K] transposed: [n_e, N]."""
    n, k = tuple(weight.shape)[1:]
    if quant is None:
        # Pre-transposed per-expert weights: MatMul reads them as they lie.
        w_t = expert_initializer(graph, weight, e, m.name(f"experts.{e}.{what}_t"), lambda w: w.T, (k, n))
        return tape.op("MatMul", [x, w_t])
    stored, scales = quantized_expert(graph, weight, e, m.name(f"experts.{e}.{what}"), quant)
    w = tape.op("DequantizeLinear", [stored, scales, zero_points[what]],
                {"axis": 1, "block_size": quant.group(k)})  # [N, K] in the model dtype
    return tape.op("Gemm", [x, w], {"transB": 1})


def _expert_branch(graph: ir.Graph, m: MoEMatch, e: int, x: ir.Value, weight_e: ir.Value, chosen: ir.Value,
                   zeros: ir.Value, quant: QuantScheme | None, zero_points: dict[str, ir.Value]) -> ir.Graph:
    """The `then` branch of expert e: [N, H] fp32 with the weighted expert output on its tokens."""
    tape = ir.tape.Tape()
    prefix = f"experts.{e}"
    rows = tape.op("Squeeze", [tape.op("NonZero", [chosen]),
                               _const(tape, np.array([0], np.int64), m.name(f"{prefix}.axes0"))])  # [n_e]
    xe = tape.op("Gather", [x, rows], {"axis": 0})  # [n_e, H]
    gate_up = _expert_matmul(tape, graph, m, e, xe, m.w_gate_up, "w_gate_up", quant, zero_points)
    gate, up = tape.op_multi_out("Split", [gate_up], {"axis": 1, "num_outputs": 2}, num_outputs=2)  # [n_e, I] each
    act = tape.op("Mul", [tape.op("Mul", [gate, tape.op("Sigmoid", [gate])]), up])
    down = _expert_matmul(tape, graph, m, e, act, m.w_down, "w_down", quant, zero_points)
    ye = tape.op("Cast", [down], {"to": FLOAT})  # [n_e, H] fp32
    we = tape.op("Unsqueeze", [tape.op("Gather", [weight_e, rows], {"axis": 0}),
                               _const(tape, np.array([1], np.int64), m.name(f"{prefix}.axes1"))])  # [n_e, 1]
    indices = tape.op("Unsqueeze", [rows, _const(tape, np.array([1], np.int64), m.name(f"{prefix}.axes1b"))])
    out = tape.op("ScatterND", [zeros, indices, tape.op("Mul", [ye, we])])  # [N, H]
    _name_nodes(tape.nodes, m.name(f"portable/{prefix}"))
    return ir.Graph([], [out], nodes=tape.nodes, name=m.name(f"{prefix}.then"))


def _zeros_branch(m: MoEMatch, e: int, zeros: ir.Value) -> ir.Graph:
    node = ir.node("Identity", [zeros], name=m.name(f"portable/experts.{e}/skip"))
    _name_nodes([node], "")
    return ir.Graph([], [node.outputs[0]], nodes=[node], name=m.name(f"experts.{e}.else"))


def lower_one(graph: ir.Graph, m: MoEMatch, quant: QuantScheme | None) -> None:
    zero_points = {} if quant is None else {what: _zero_point(graph, m, w, quant, what)
                                            for what, w in (("w_gate_up", m.w_gate_up), ("w_down", m.w_down))}
    tape = ir.tape.Tape()
    probs = tape.op("Softmax", [tape.op("Cast", [m.router_logits], {"to": FLOAT})], {"axis": -1})  # [N, E]
    top_w, top_e = tape.op_multi_out(
        "TopK", [probs, _const(tape, np.array([m.top_k], np.int64), m.name("k"))],
        {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)  # [N, K]
    if m.normalize:
        axes = _const(tape, np.array([-1], np.int64), m.name("axes_last"))
        top_w = tape.op("Div", [top_w, tape.op("ReduceSum", [top_w, axes], {"keepdims": 1})])
    zero_e = tape.op("ConstantOfShape", [tape.op("Shape", [probs])], {"value": ir.tensor(np.zeros(1, np.float32))})
    dense = tape.op("ScatterElements", [zero_e, top_e, top_w], {"axis": 1})  # [N, E], 0 where unselected
    # Only tokens that chose expert e have a weight > 0 in column e; ScatterElements wrote exactly those.
    zeros = tape.op("ConstantOfShape", [tape.op("Shape", [m.x])], {"value": ir.tensor(np.zeros(1, np.float32))})
    total = None
    for e in range(m.num_experts):
        weight_e = tape.op("Gather", [dense, _const(tape, np.array(e, np.int64), m.name(f"experts.{e}.index"))],
                           {"axis": 1})  # [N]
        # Chosen: weight not 0. A NaN weight (a token without a softmax, see mixexport.model.moe)
        # counts as chosen, so that token's row comes out NaN as the MoE op's rule says.
        chosen = tape.op("Not", [tape.op("Equal", [weight_e, _const(tape, np.array(0, np.float32),
                                                                      m.name(f"experts.{e}.zero_w"))])])  # [N]
        used = tape.op("ReduceMax", [tape.op("Cast", [chosen], {"to": ir.DataType.INT32})], {"keepdims": 0})
        branch = tape.op("If", [tape.op("Cast", [used], {"to": ir.DataType.BOOL})], {
            "then_branch": ir.Attr("then_branch", ir.AttributeType.GRAPH,
                                   _expert_branch(graph, m, e, m.x, weight_e, chosen, zeros,
                                                                  quant, zero_points)),
            "else_branch": ir.Attr("else_branch", ir.AttributeType.GRAPH, _zeros_branch(m, e, zeros)),
        }, name=m.name(f"portable/experts.{e}/If"))
        total = branch if total is None else tape.op("Add", [total, branch])
    out = tape.op("Cast", [total], {"to": m.dtype})  # [N, H]
    _name_nodes(tape.nodes, m.name("portable"))
    replace_moe(graph, m, list(tape.nodes), out)


class LowerMoEToPortable(MoELowering):
    """Replace every `mixexport.MoE` node with standard ONNX ops (sparse, one If per expert)."""

    quant_opset = 21  # DequantizeLinear with blocked quantization and uint4
    lower_one = staticmethod(lower_one)
