"""Give the captured graph the names the contract and validation rely on.

- Output dimensions: the exporter names the present length `past_sequence + sequence`; the
  contract (and `attention_mask`) call it `total_sequence`.
- Router logits: the value feeding each MoE node is named `layers.{i}.moe.router_logits`, so
  validation can expose it and measure router-decision agreement in every target.
- Residual stream: the embedding's output is `hidden_states.0` and the residual Add after layer
  i's MoE block `hidden_states.{i+1}`, the values stage graphs are cut at (`passes.stages`).
  Named here, on the captured graph, where the MoE node still marks each layer's end; the
  lowerings keep these values (they rewrite what lies between them).
"""

from __future__ import annotations

import onnx_ir as ir

from mixexport import graph_io
from mixexport.passes.base import RewriteResult
from mixexport.passes.moe_nodes import find_moe

EMBEDDING_WEIGHT = "embed_tokens.weight"  # the reference model's parameter name (model.decoder)


class NameGraph(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> RewriteResult:
        rewrites = 0
        for value in model.graph.outputs:
            if value.shape is None:
                continue
            dims = [graph_io.TOTAL if isinstance(d, ir.SymbolicDim) and d.value and "+" in d.value else d
                    for d in value.shape]
            if list(value.shape) != dims:
                value.shape = ir.Shape(dims)
                rewrites += 1
        for m in find_moe(model.graph):
            name = graph_io.router_logits_name(m.layer)
            if m.router_logits.name != name:
                m.router_logits.name = name
                rewrites += 1
        for value, name in _residual_stream(model.graph):
            if value.name != name:
                value.name = name
                rewrites += 1
        return RewriteResult(model, bool(rewrites), rewrites=rewrites)


# Ops between a MoE node's [N, H] output and the residual Add that takes it back to [B, S, H].
_SHAPE_OPS = frozenset({"Reshape", "View"})


def _residual_stream(graph: ir.Graph) -> list[tuple[ir.Value, str]]:
    """(value, its hidden_states name) for the embedding output and each layer's output, where the
    graph has them (a lone MoE block in a test has neither)."""
    found = []
    embed = graph.initializers.get(EMBEDDING_WEIGHT)
    gathers = [node for node, _ in embed.uses() if node.op_type == "Gather"] if embed is not None else []
    if len(gathers) == 1:
        found.append((gathers[0].outputs[0], graph_io.hidden_state_name(0)))
    for m in find_moe(graph):
        value = m.node.outputs[0]
        while True:
            users = [node for node, _ in value.uses()]
            if len(users) != 1:
                break
            if users[0].op_type in _SHAPE_OPS:
                value = users[0].outputs[0]
            elif users[0].op_type == "Add":
                found.append((users[0].outputs[0], graph_io.hidden_state_name(m.layer + 1)))
                break
            else:
                break
    return found
