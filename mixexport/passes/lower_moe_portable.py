"""Lower `mixexport.MoE` to standard ONNX ops only: the artifact that runs on any runtime, and
the no-plugin TensorRT baseline.

All experts are computed densely as two batched MatMuls over [E, N, ...] and the routing weights
(zero for unselected experts) pick the result. That is E/K times the minimum arithmetic, but it
is shape-static, has no data-dependent control flow, and every ONNX runtime runs it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mixexport.passes.base import derived_initializer
from mixexport.passes.moe_nodes import MoELowering, MoEMatch, replace_moe

FLOAT = ir.DataType.FLOAT


def _const(tape: ir.tape.Tape, array: np.ndarray, name: str) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(array, name=name)}, name=name)


def lower_one(graph: ir.Graph, m: MoEMatch) -> None:
    tape = ir.tape.Tape()
    e, i, h = m.num_experts, m.inter, m.hidden
    # Routing, in fp32: p = softmax(logits); TopK breaks ties toward the lower index (ONNX spec).
    probs = tape.op("Softmax", [tape.op("Cast", [m.router_logits], {"to": FLOAT})], {"axis": -1})  # [N, E]
    top_w, top_e = tape.op_multi_out(
        "TopK", [probs, _const(tape, np.array([m.top_k], np.int64), m.name("k"))],
        {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)  # [N, K]
    if m.normalize:
        axes = _const(tape, np.array([-1], np.int64), m.name("axes_last"))
        top_w = tape.op("Div", [top_w, tape.op("ReduceSum", [top_w, axes], {"keepdims": 1})])
    zeros = tape.op("ConstantOfShape", [tape.op("Shape", [probs])],
                    {"value": ir.tensor(np.zeros(1, np.float32))})
    dense = tape.op("ScatterElements", [zeros, top_e, top_w], {"axis": 1})  # [N, E], 0 where unselected
    route = tape.op("Unsqueeze", [tape.op("Transpose", [dense], {"perm": [1, 0]}),
                                  _const(tape, np.array([2], np.int64), m.name("axes_2"))])  # [E, N, 1]

    # Experts, every token through every expert. Weights are stored pre-transposed ([E, H, 2I],
    # [E, I, H]) so MatMul reads them as they lie, with no runtime Transpose.
    w_gate_up_t = derived_initializer(graph, m.w_gate_up, m.name("w_gate_up_t"),
                                      lambda w: w.transpose(0, 2, 1), (e, h, 2 * i))
    w_down_t = derived_initializer(graph, m.w_down, m.name("w_down_t"),
                                   lambda w: w.transpose(0, 2, 1), (e, i, h))
    x = tape.op("Unsqueeze", [m.x, _const(tape, np.array([0], np.int64), m.name("axes_0"))])  # [1, N, H]
    gate, up = tape.op_multi_out("Split", [tape.op("MatMul", [x, w_gate_up_t])], {"axis": 2, "num_outputs": 2},
                                 num_outputs=2)  # [E, N, I] each
    act = tape.op("Mul", [tape.op("Mul", [gate, tape.op("Sigmoid", [gate])]), up])
    y = tape.op("Cast", [tape.op("MatMul", [act, w_down_t])], {"to": FLOAT})  # [E, N, H] fp32
    summed = tape.op("ReduceSum", [tape.op("Mul", [y, route]),
                                   _const(tape, np.array([0], np.int64), m.name("axes_0b"))], {"keepdims": 0})
    out = tape.op("Cast", [summed], {"to": m.dtype})  # [N, H]
    for n, node in enumerate(tape.nodes):
        node.name = node.name or m.name(f"portable/{node.op_type}_{n}")
    replace_moe(graph, m, list(tape.nodes), out)


class LowerMoEToPortable(MoELowering):
    """Replace every `mixexport.MoE` node with standard ONNX ops."""

    lower_one = staticmethod(lower_one)
