"""Fold `Transpose(weight)` into a pre-transposed initializer.

torch.onnx exports every `nn.Linear` as `MatMul(x, Transpose(W))`. Left alone, each runtime
transposes every weight at load time (onnxruntime keeps both copies while it folds); folded here,
the transposed copy is written once, streamed from the checkpoint, and nothing runs at load.
"""

from __future__ import annotations

import onnx_ir as ir

from mixexport.passes.base import RewriteResult, derived_initializer


class FoldWeightTranspose(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> RewriteResult:
        graph = model.graph
        rewrites = 0
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain != "":
                continue
            weight = node.inputs[0]
            if weight is None or not weight.is_initializer() or weight.const_value is None:
                continue
            rank = len(weight.shape)
            perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else tuple(reversed(range(rank)))
            shape = tuple(weight.shape[p] for p in perm)
            folded = derived_initializer(graph, weight, f"{weight.name}_t", lambda w, perm=perm: w.transpose(perm),
                                         shape)
            ir.convenience.replace_all_uses_with(node.outputs[0], folded)
            graph.remove(node, safe=True)
            if not weight.uses():
                graph.initializers.pop(weight.name)
            rewrites += 1
        return RewriteResult(model, bool(rewrites), rewrites=rewrites)
