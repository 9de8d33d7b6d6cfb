"""Leave onnxruntime nothing to fold or fuse at load (ort target only, its last pass).

onnxruntime rewrites a graph at load (graph optimization level "all", its default) before the
first run. On the mid model's ort graph (onnxruntime 1.32 CPU, `so.optimized_model_filepath`) it
turned every Constant node (382 of 1765 nodes, most in the If branches) into an initializer,
folded the exporter's constant arithmetic (RoPE's inverse frequencies: Pow, Reciprocal, CastLike),
merged the per-layer copies of the same shape computations (Reshape and Concat of the batch and
sequence sizes, 8 copies each), and fused each expert's `x * Sigmoid(x)` into com.microsoft.QuickGelu.
This pass does the same when the graph is built, so that the file is the graph that runs (the
optimized graph has as many nodes as ours; onnxruntime still merges a few equal per-layer
constants, initializers whose names keep them in their layer, see below):

1. constant folding (onnxscript's optimizer), never of a node that reads a weight: weights stay
   lazy and unread;
2. Constant nodes, in the main graph and in every If branch, become main-graph initializers,
   but for float constants of another dtype than the weights' (fp32 statistics and RoPE tables
   in a float16 graph): a mixexport graph's float initializers are all of its dtype, which is how
   `validate.inventory` reads a graph's dtype, so those few are Constant nodes, folded;
3. equal small constants that belong to no layer (the exporter's `val_*`: `passes.stages`
   copies such shared constants into each stage) become one, and then common subexpressions
   (onnx-ir's pass) are merged. Constants named after a layer are left alone: a stage graph may
   read only its own layers' initializers;
4. `Mul(x, Sigmoid(x))` becomes `com.microsoft.QuickGelu(x, alpha=1)`, which is what onnxruntime
   runs for it on CPU and CUDA (so the numbers are those onnxruntime computed before).

It runs before `check_attention_mask` adds the mask check: a folder that trusts equal symbolic
dimension names could fold that check away (its docstring says why it is built as it is).
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass

from mixexport.passes.base import RewriteResult
from mixexport.passes.stages import weight_owner
from mixexport.targets.ort.lowering import ORT_DOMAIN

# Shared constants merged by value are shape vectors and scalars; anything larger is left alone.
MAX_MERGED_ELEMENTS = 64


FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def graph_dtype(graph: ir.Graph) -> ir.DataType | None:
    """The graph's float dtype: its KV cache's."""
    past = next((v for v in graph.inputs if v.name.startswith("past_key_values.")), None)
    return past.dtype if past is not None else None


def _foreign_float(dtype: ir.DataType | None, graph: ir.Graph) -> bool:
    """A float dtype other than the graph's: constants of it stay nodes (module docstring, step 2)."""
    return dtype in FLOATS and dtype != graph_dtype(graph)


def _reads_a_weight(node: ir.Node) -> bool | None:
    """onnxscript's `should_fold`: never (False) for a node that reads a lazy initializer (a weight),
    else its own rules (None)."""
    if any(v is not None and isinstance(v.const_value, ir.LazyTensor) for v in node.inputs):
        return False
    return None


def _lift_constants(model: ir.Model) -> None:
    """Make every Constant node (branches included) a main-graph initializer of the same name."""
    graph = model.graph
    for node in list(ir.traversal.RecursiveGraphIterator(graph)):
        if node.op_type != "Constant" or node.domain != "":
            continue
        value = node.outputs[0]
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None or value.name in graph.initializers:
            continue
        lifted = ir.Value(name=value.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                          const_value=tensor)
        value.name = None
        ir.convenience.replace_all_uses_with(value, lifted)
        node.graph.remove(node, safe=True)
        graph.register_initializer(lifted)


def _foreign_floats_as_nodes(graph: ir.Graph) -> None:
    """Turn in-memory initializers of a float dtype other than the graph's into Constant nodes at
    the graph's start (module docstring, step 2)."""
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if isinstance(tensor, ir.LazyTensor) or not _foreign_float(value.dtype, graph):
            continue
        del graph.initializers[name]
        node = ir.node("Constant", [], attributes={"value": tensor}, name=f"{name}/constant")
        graph.insert_before(next(iter(graph)), node)
        out = node.outputs[0]
        value.name = None
        out.name, out.shape, out.type = name, value.shape, value.type
        ir.convenience.replace_all_uses_with(value, out)


def _merge_shared_constants(graph: ir.Graph) -> int:
    """Make equal small in-memory initializers that belong to no layer one; returns how many went."""
    first: dict[tuple, ir.Value] = {}
    merged = 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if (weight_owner(name) is not None or tensor is None or isinstance(tensor, ir.LazyTensor)
                or tensor.size > MAX_MERGED_ELEMENTS or value in graph.inputs or value in graph.outputs):
            continue
        key = (tensor.dtype, tuple(tensor.shape), tensor.numpy().tobytes())
        if key in first:
            value.replace_all_uses_with(first[key])
            del graph.initializers[name]
            merged += 1
        else:
            first[key] = value
    return merged


def _quick_gelu(model: ir.Model) -> int:
    """Rewrite every `Mul(x, Sigmoid(x))` (main graph and branches) into QuickGelu; returns how many."""
    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Mul" or node.domain != "" or len(node.inputs) != 2:
            continue
        for x, s in (node.inputs, node.inputs[::-1]):
            sigmoid = s.producer() if s is not None else None
            if (sigmoid is None or sigmoid.op_type != "Sigmoid" or sigmoid.domain != "" or sigmoid.inputs[0] is not x
                    or len(s.uses()) != 1 or sigmoid.graph is not node.graph):
                continue
            fused = ir.node("QuickGelu", [x], attributes={"alpha": 1.0}, domain=ORT_DOMAIN, name=f"{node.name}/quick_gelu")
            graph = node.graph
            graph.insert_before(node, fused)
            out = fused.outputs[0]
            out.name, out.shape, out.type = node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type
            node.outputs[0].name = None
            ir.convenience.replace_all_uses_with(node.outputs[0], out)
            graph.remove([node, sigmoid], safe=True)
            count += 1
            break
    if count:
        model.opset_imports.setdefault(ORT_DOMAIN, 1)
    return count


class FoldForOrt(ir.passes.InPlacePass):
    """Do at build time what onnxruntime would do to the graph at load (module docstring)."""

    def call(self, model: ir.Model) -> RewriteResult:
        before = sum(1 for _ in model.graph.all_nodes())
        onnxscript.optimizer.fold_constants(model, should_fold=_reads_a_weight)
        _lift_constants(model)
        merged = _merge_shared_constants(model.graph)
        CommonSubexpressionEliminationPass()(model)
        fused = _quick_gelu(model)
        _foreign_floats_as_nodes(model.graph)
        RemoveUnusedNodesPass()(model)
        removed = before - sum(1 for _ in model.graph.all_nodes())
        return RewriteResult(model, bool(removed or merged or fused), rewrites=removed)
