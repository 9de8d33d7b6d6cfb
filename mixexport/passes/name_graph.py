"""Give the captured graph the names the contract and validation rely on.

- Output dimensions: the exporter names the present length `past_sequence + sequence`; the
  contract (and `attention_mask`) call it `total_sequence`.
- Router logits: the value feeding each MoE node is named `layers.{i}.moe.router_logits`, so
  validation can expose it and measure router-decision agreement in every target.
"""

from __future__ import annotations

import onnx_ir as ir

from mixexport import graph_io
from mixexport.passes.base import RewriteResult
from mixexport.passes.moe_nodes import find_moe


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
        return RewriteResult(model, bool(rewrites), rewrites=rewrites)
