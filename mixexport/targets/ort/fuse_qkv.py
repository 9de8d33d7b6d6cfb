"""Fuse each layer's q, k and v projections into one MatMul on a concatenated weight (ort target only).

Captured, attention reads its input three times: `x @ Wq`, `x @ Wk`, `x @ Wv`, three GEMVs at decode,
each a kernel launch with its own thread-pool fork and join. This pass writes one initializer
`layers.{i}.self_attn.qkv_proj.weight_t` [H, (Hq + 2 KVH) * D] (Wq | Wk | Wv along the output axis,
concatenated lazily when the model is saved, `passes.base.concatenated_initializer`) and replaces the
three MatMuls with

    MatMul(x, Wqkv) -> Split(axis -1, [Hq*D, KVH*D, KVH*D]) -> q, k, v

whose outputs take the old ones' places, so whatever the attention fusion built on q, k and v
(RotaryEmbedding, Attention or GroupQueryAttention) reads them unchanged. Each output column is the
same dot product as before, so the result is the unfused one exactly (up to the GEMM's blocking).

GroupQueryAttention also takes q, k and v packed in one input (key and value empty), but only when
it applies RoPE itself (`do_rotary`); `fuse_gqa` keeps RoPE in front (its docstring says why), so
the shared layout splits here too.

It runs after the attention fusion, which finds each layer by the three projections
(`fuse_attention.match_attention`), and declines, with a reason, when a layer's projections are
not three MatMuls on one input with those weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from mixexport.passes.base import PerLayerFusion, concatenated_initializer
from mixexport.targets.ort.fuse_attention import GraphBuilder, projection


@dataclasses.dataclass
class QkvMatch:
    layer: int
    x: ir.Value  # [B, S, H] the normalised hidden state all three read
    matmuls: list[ir.Node]  # q, k, v projections, in that order

    def name(self, what: str) -> str:
        return f"layers.{self.layer}.self_attn.ort/{what}"


def match_qkv(graph: ir.Graph, layer: int) -> QkvMatch | str:
    """Layer `layer`'s three projections, or why they cannot be fused."""
    matmuls = []
    for proj in "qkv":
        node = projection(graph, layer, proj)
        if isinstance(node, str):
            return f"layer {layer}: {node}"
        matmuls.append(node)
    x = matmuls[0].inputs[0]
    if any(node.inputs[0] is not x for node in matmuls):
        return f"layer {layer}: q, k and v projections do not share one input"
    weights = [node.inputs[1] for node in matmuls]
    if any(w.shape is None or len(w.shape) != 2 or w.shape[0] != weights[0].shape[0] or w.dtype != weights[0].dtype
           for w in weights):
        return f"layer {layer}: projection weights {[w.shape for w in weights]} are not [H, N] of one dtype"
    return QkvMatch(layer, x, matmuls)


class FuseQkvOrt(PerLayerFusion):
    """Rewrite every layer's q, k, v MatMuls into one MatMul + Split."""

    def match(self, model: ir.Model) -> list[QkvMatch | str]:
        return [match_qkv(model.graph, i) for i in range(self.num_layers)]

    def rewrite(self, model: ir.Model, matches: list[QkvMatch]) -> None:
        graph = model.graph
        b = GraphBuilder(graph)
        for m in matches:
            weights = [node.inputs[1] for node in m.matmuls]
            fused = concatenated_initializer(graph, weights, f"layers.{m.layer}.self_attn.qkv_proj.weight_t", axis=1)
            at = min(m.matmuls, key=list(graph).index)  # the first of the three: x is computed by then
            widths = np.array([w.shape[1] for w in weights], np.int64)
            qkv = b.node(at, "MatMul", [m.x, fused], m.name("qkv_proj"))
            parts = b.node(at, "Split", [qkv, b.const(m.name("qkv_widths"), widths)], m.name("qkv_split"),
                           outputs=3, axis=-1)
            for node, part in zip(m.matmuls, parts):
                old = node.outputs[0]
                part.shape, part.type = old.shape, old.type
                ir.convenience.replace_all_uses_with(old, part)
                graph.remove(node, safe=True)
            for weight in weights:
                graph.initializers.pop(weight.name)
