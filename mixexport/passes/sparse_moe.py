"""The sparse MoE form in standard ONNX ops: routing, then one `If` per expert that runs only when
some token chose it. Shared by the `portable` lowering and the `ort` lowering for onnxruntime's CPU
provider.

Routing is Softmax + TopK (ties go to the lower index by the ONNX spec). An expert's branch gathers
just its tokens, runs its two matrix products on its own weights (how is the caller's
`ExpertMatMul`: a MatMul on pre-transposed weights, a dequantize + Gemm, ...) and scatters the
weighted rows back. A decode step therefore reads K experts' weights, not E; because each expert's
weights are a plain initializer, a runtime pre-packs them for its GEMM and runs every expert on all
its threads (onnxruntime's CPU `com.microsoft.MoE` runs each expert on one thread, and measured 5x
slower at batch 1 on a 214M model: see `targets/ort/lowering.py`).

Per layer the main graph runs only the routing (a handful of ops), one If per expert and one Sum:
which experts were chosen is computed once per layer and split into the Ifs' conditions, and each
branch reads its own column of the routing. (One Gather, compare, reduce and Add per expert in the
main graph made a `mid` decode step run about 1000 kernels; this form, about 580, onnxruntime 1.32.)

Non-finite router logits: a NaN weight (a token without a softmax, `mixexport.model.moe`) counts as
chosen, so that token's row comes out NaN, as the MoE op's rule says.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from mixexport.passes.base import expert_initializer
from mixexport.passes.moe_nodes import MoEMatch, replace_moe

FLOAT = ir.DataType.FLOAT
# (tape, graph, match, expert e, x [n_e, K], the [E, N, K] weight stack, "w_gate_up" or "w_down")
#   -> x @ expert e's weight [N, K] transposed: [n_e, N] in the model dtype
ExpertMatMul = Callable[[ir.tape.Tape, ir.Graph, MoEMatch, int, ir.Value, ir.Value, str], ir.Value]


def const(tape: ir.tape.Tape, array: np.ndarray, name: str) -> ir.Value:
    """A Constant node's output holding `array`, named `name`."""
    return tape.op("Constant", [], {"value": ir.tensor(array, name=name)}, name=name)


def name_nodes(nodes, prefix: str) -> None:
    """Name nodes and their outputs after the layer: ONNX wants value names unique across the
    main graph and every If branch, which per-graph automatic names are not."""
    for n, node in enumerate(nodes):
        node.name = node.name or f"{prefix}/{node.op_type}_{n}"
        for k, value in enumerate(node.outputs):
            value.name = f"{node.name}:{k}"


def transposed_matmul(tape: ir.tape.Tape, graph: ir.Graph, m: MoEMatch, e: int, x: ir.Value, weight: ir.Value,
                      what: str) -> ir.Value:
    """The full-precision `ExpertMatMul`: expert e's weight stored pre-transposed [K, N] (lazily),
    so MatMul reads it as it lies."""
    n, k = tuple(weight.shape)[1:]
    w_t = expert_initializer(graph, weight, e, m.name(f"experts.{e}.{what}_t"), lambda w: w.T, (k, n))
    return tape.op("MatMul", [x, w_t])


def _expert_branch(graph: ir.Graph, m: MoEMatch, e: int, dense: ir.Value, chosen: ir.Value, zeros: ir.Value,
                   matmul: ExpertMatMul, target: str) -> ir.Graph:
    """The `then` branch of expert e: [N, H] fp32 with the weighted expert output on its tokens.

    It reads expert e's columns of the layer's routing (`dense` weights, `chosen` flags, [N, E])
    itself: the main graph then runs nothing per expert but the If, whichever experts were chosen.
    """
    tape = ir.tape.Tape()
    prefix = f"experts.{e}"
    index = const(tape, np.array(e, np.int64), m.name(f"{prefix}.index"))
    rows = tape.op("Squeeze", [tape.op("NonZero", [tape.op("Gather", [chosen, index], {"axis": 1})]),
                               const(tape, np.array([0], np.int64), m.name(f"{prefix}.axes0"))])  # [n_e]
    xe = tape.op("Gather", [m.x, rows], {"axis": 0})  # [n_e, H]
    gate_up = matmul(tape, graph, m, e, xe, m.w_gate_up, "w_gate_up")
    gate, up = tape.op_multi_out("Split", [gate_up], {"axis": 1, "num_outputs": 2}, num_outputs=2)  # [n_e, I] each
    act = tape.op("Mul", [tape.op("Mul", [gate, tape.op("Sigmoid", [gate])]), up])
    ye = matmul(tape, graph, m, e, act, m.w_down, "w_down")
    if m.dtype != FLOAT:
        ye = tape.op("Cast", [ye], {"to": FLOAT})  # [n_e, H] fp32
    # [n_e, 1]: Gather with a 1-D index keeps expert e's column as a dimension
    column = tape.op("Gather", [dense, const(tape, np.array([e], np.int64), m.name(f"{prefix}.column"))], {"axis": 1})
    we = tape.op("Gather", [column, rows], {"axis": 0})
    indices = tape.op("Unsqueeze", [rows, const(tape, np.array([1], np.int64), m.name(f"{prefix}.axes1"))])
    out = tape.op("ScatterND", [zeros, indices, tape.op("Mul", [ye, we])])  # [N, H]
    name_nodes(tape.nodes, m.name(f"{target}/{prefix}"))
    return ir.Graph([], [out], nodes=tape.nodes, name=m.name(f"{prefix}.then"))


def _zeros_branch(m: MoEMatch, e: int, zeros: ir.Value, target: str) -> ir.Graph:
    node = ir.node("Identity", [zeros], name=m.name(f"{target}/experts.{e}/skip"))
    name_nodes([node], "")
    return ir.Graph([], [node.outputs[0]], nodes=[node], name=m.name(f"experts.{e}.else"))


def lower_sparse(graph: ir.Graph, m: MoEMatch, matmul: ExpertMatMul, target: str) -> None:
    """Replace one MoE node with routing + one `If` per expert.

    Args:
        graph: the graph holding the match.
        m: the MoE node to lower.
        matmul: how an expert multiplies by its weights (full precision: `transposed_matmul`).
        target: the target's name, the first part of every new node's name after the layer's.
    """
    tape = ir.tape.Tape()
    logits = m.router_logits if m.router_logits.dtype == FLOAT else tape.op("Cast", [m.router_logits], {"to": FLOAT})
    probs = tape.op("Softmax", [logits], {"axis": -1})  # [N, E]
    top_w, top_e = tape.op_multi_out(
        "TopK", [probs, const(tape, np.array([m.top_k], np.int64), m.name("k"))],
        {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)  # [N, K]
    if m.normalize:
        axes = const(tape, np.array([-1], np.int64), m.name("axes_last"))
        top_w = tape.op("Div", [top_w, tape.op("ReduceSum", [top_w, axes], {"keepdims": 1})])
    zero_e = tape.op("ConstantOfShape", [tape.op("Shape", [probs])], {"value": ir.tensor(np.zeros(1, np.float32))})
    dense = tape.op("ScatterElements", [zero_e, top_e, top_w], {"axis": 1})  # [N, E], 0 where unselected
    # Only tokens that chose expert e have a weight > 0 in column e; ScatterElements wrote exactly those.
    # Chosen: weight not 0; a NaN weight counts as chosen (the non-finite rule, module docstring).
    chosen = tape.op("Not", [tape.op("Equal", [dense, const(tape, np.array(0, np.float32), m.name("zero_w"))])])
    # [E] whether any token chose each expert, split into one [1] condition per If: per layer,
    # not per expert, so a decode step runs a handful of small ops here rather than E times as many.
    used = tape.op("ReduceMax", [tape.op("Cast", [chosen], {"to": ir.DataType.INT32}),
                                 const(tape, np.array([0], np.int64), m.name("axes_tokens"))], {"keepdims": 0})
    used = tape.op("Cast", [used], {"to": ir.DataType.BOOL})
    conditions = (tape.op_multi_out("Split", [used], {"axis": 0, "num_outputs": m.num_experts},
                                    num_outputs=m.num_experts) if m.num_experts > 1 else [used])
    zeros = tape.op("ConstantOfShape", [tape.op("Shape", [m.x])], {"value": ir.tensor(np.zeros(1, np.float32))})
    branches = []
    for e in range(m.num_experts):
        branches.append(tape.op("If", [conditions[e]], {
            "then_branch": ir.Attr("then_branch", ir.AttributeType.GRAPH,
                                   _expert_branch(graph, m, e, dense, chosen, zeros, matmul, target)),
            "else_branch": ir.Attr("else_branch", ir.AttributeType.GRAPH, _zeros_branch(m, e, zeros, target)),
        }, name=m.name(f"{target}/experts.{e}/If")))
    # One Sum, not an Add per expert: the unchosen experts add exact zeros, so it is the same sum.
    total = tape.op("Sum", branches) if len(branches) > 1 else branches[0]
    out = total if m.dtype == FLOAT else tape.op("Cast", [total], {"to": m.dtype})  # [N, H]
    name_nodes(tape.nodes, m.name(target))
    replace_moe(graph, m, list(tape.nodes), out)
