"""name_graph: `past + sequence` output dims become `total_sequence`; router logits get layer names."""

from __future__ import annotations

import onnx_ir as ir

from mixexport import graph_io
from mixexport.graph_io import router_logits_name
from mixexport.passes.name_graph import NameGraph
from passes.single_moe import moe_weights, single_moe_model


def test_renames_router_logits_and_total_dim():
    model = single_moe_model(*moe_weights(4, 8, 6), top_k=2, normalize=True, layer=7)
    y = model.graph.outputs[0]
    y.shape = ir.Shape([f"{graph_io.PAST} + {graph_io.SEQUENCE}", 8])
    result = NameGraph()(model)
    assert result.rewrites == 2
    assert list(y.shape) == [ir.SymbolicDim(graph_io.TOTAL), 8]
    (node,) = list(model.graph)
    assert node.inputs[1].name == router_logits_name(7) == "layers.7.moe.router_logits"
    again = NameGraph()(model)
    assert not again.modified and again.rewrites == 0


def test_leaves_plain_dims_alone():
    model = single_moe_model(*moe_weights(4, 8, 6), top_k=2, normalize=True)
    model.graph.node(0).inputs[1].name = router_logits_name(0)
    result = NameGraph()(model)
    assert result.rewrites == 0
    assert list(model.graph.outputs[0].shape) == [ir.SymbolicDim("N"), 8]
