"""Fuse each decoder layer's attention into onnxruntime's fused opset-23 ops (ort target only).

Captured, one layer's attention is ~25 basic ops (Q/K/V reshapes and transposes, rotate-half RoPE,
Concat with the past, repeat-interleave for grouped KV heads, MatMul, Where, Softmax, MatMul);
at decode each of them is a kernel launch on a tiny tensor. This pass keeps the four projection
MatMuls and replaces everything between them with

    RotaryEmbedding(q), RotaryEmbedding(k)                     ai.onnx opset 23, rotate-half
    Attention(q, k, v, mask, past_key, past_value)            ai.onnx opset 23, grouped KV heads
        -> y [B, S, Hq*D] (into o_proj), present_key, present_value [B, KVH, T, D]

Standard `Attention` rather than com.microsoft.GroupQueryAttention: onnxruntime's CPU GQA refuses
batch > 1 with S > 1 and a past (chunked prefill), which the graph contract allows, and it cannot
take left padding. Its present outputs are concat(past, rotated key) and concat(past, value), the
contract's concat layout; `fuse_gqa` builds the shared-buffer layout with GroupQueryAttention.

The mask stays the captured one ([B, 1, S, T] bool: causal, padding and sliding window, computed
once per graph). One difference needs care: for a query row with no visible key (a left-padding
query), the reference softmaxes a row of finfo.min, i.e. averages all T values, where onnxruntime's
Attention returns 0. So, once per graph, such rows are made fully visible, and per layer their
query is zeroed: zero scores over all T keys are exactly that uniform average.

The pass recognises the decoder that `mixexport.capture` exports by its anchors (the projection
weights `layers.{i}.self_attn.{q,k,v,o}_proj.weight_t` after FoldWeightTranspose, the
`present.{i}.*` outputs, the Where before each Softmax) and declines, with a reason, when any is
not as expected. Weights are only re-wired, never read, so lazy initializers stay lazy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mixexport.passes.base import PerLayerFusion, match_from, require_opset

OPSET = 23  # the first standard opset with Attention and RotaryEmbedding


@dataclasses.dataclass
class AttentionMatch:
    layer: int
    q: ir.Value  # [B, S, Hq*D] q_proj output
    k: ir.Value  # [B, S, KVH*D]
    v: ir.Value  # [B, S, KVH*D]
    out: ir.Value  # the value o_proj consumes: [B, S, Hq*D]
    o_proj: ir.Node  # new nodes go right before it: everything they read is computed by then
    present_key: ir.Value  # graph outputs, [B, KVH, T, D]
    present_value: ir.Value
    past_key: ir.Value  # graph inputs, [B, KVH, P, D]
    past_value: ir.Value
    cos: ir.Value  # [B, S, D] in the model dtype, as the captured RoPE uses it
    sin: ir.Value
    q_heads: int
    kv_heads: int
    head_dim: int

    def name(self, what: str) -> str:
        return f"layers.{self.layer}.self_attn.ort/{what}"


def projection(graph: ir.Graph, layer: int, proj: str) -> ir.Node | str:
    name = f"layers.{layer}.self_attn.{proj}_proj.weight_t"
    weight = graph.initializers.get(name)
    if weight is None:
        return f"no initializer {name} (FoldWeightTranspose must run first)"
    users = [node for node, _ in weight.uses()]
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[1] is not weight:
        return f"{name} is not the weight of exactly one MatMul"
    return users[0]


def _output(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.outputs if v.name == name), None)


def _input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _rope(op, x, cos, sin):
    """The captured RoPE as an onnxscript pattern: `x * Unsqueeze(cos) + rotate_half(x) * Unsqueeze(sin)`
    with rotate_half(x) = Concat(-x2, x1) of two Slices of x."""
    half = op.Concat(op.Neg(op.Slice(x, _allow_other_inputs=True)), op.Slice(x, _allow_other_inputs=True))
    return op.Add(op.Mul(x, op.Unsqueeze(cos, _allow_other_inputs=True)),
                  op.Mul(half, op.Unsqueeze(sin, _allow_other_inputs=True)))


# Every order of the Add's and both Muls' inputs (a rule only to get `commute`: nothing is rewritten by it).
_ROPES = pattern.RewriteRule(_rope, lambda op, **_: None).commute()


def _rope_cos_sin(graph: ir.Graph, rotated: ir.Value) -> tuple[ir.Value, ir.Value] | str:
    """cos, sin [B, S, D] from the captured RoPE computing `rotated`."""
    add = rotated.producer()
    found = match_from(_ROPES, graph, add) if add is not None else None
    if not found:
        why = found.reason if found is not None else "a graph input"
        return f"rotated key {rotated.name} is not x * cos + rotate_half(x) * sin: {why}"
    return found.bindings["cos"], found.bindings["sin"]


def match_attention(graph: ir.Graph, layer: int) -> AttentionMatch | str:
    """Find layer `layer`'s attention anchors; a string says why it cannot be fused."""
    nodes = {}
    for proj in "qkvo":
        node = projection(graph, layer, proj)
        if isinstance(node, str):
            return node
        nodes[proj] = node
    x = nodes["q"].inputs[0]
    if nodes["k"].inputs[0] is not x or nodes["v"].inputs[0] is not x:
        return f"layer {layer}: q, k and v projections do not share one input"
    ends = {}
    for kind in ("key", "value"):
        present = _output(graph, f"present.{layer}.{kind}")
        past = _input(graph, f"past_key_values.{layer}.{kind}")
        concat = present.producer() if present is not None else None
        if (past is None or concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2
                or concat.inputs[0] is not past or concat.attributes["axis"].as_int() not in (2, -2)):
            return f"layer {layer}: present.{layer}.{kind} is not Concat(past_key_values.{layer}.{kind}, new, axis=2)"
        ends[kind] = (present, past, concat.inputs[1])
    tables = _rope_cos_sin(graph, ends["key"][2])
    if isinstance(tables, str):
        return f"layer {layer}: {tables}"
    past_shape = ends["key"][1].shape
    if past_shape is None or len(past_shape) != 4 or not all(isinstance(d, int) for d in past_shape[1::2]):
        return f"layer {layer}: past key shape {past_shape} lacks static KVH and D"
    kv_heads, head_dim = past_shape[1], past_shape[3]
    widths = [nodes[p].inputs[1].shape[1] for p in "qkv"]
    if widths[0] % head_dim or widths[1] != kv_heads * head_dim or widths[2] != kv_heads * head_dim:
        return f"layer {layer}: projection widths {widths} do not fit KVH={kv_heads}, D={head_dim}"
    q_heads = widths[0] // head_dim
    if q_heads % kv_heads:
        return f"layer {layer}: {q_heads} query heads are not a multiple of {kv_heads} KV heads"
    return AttentionMatch(layer, nodes["q"].outputs[0], nodes["k"].outputs[0], nodes["v"].outputs[0],
                          nodes["o"].inputs[0], nodes["o"], ends["key"][0], ends["value"][0], ends["key"][1],
                          ends["value"][1], tables[0], tables[1], q_heads, kv_heads, head_dim)


def find_mask(graph: ir.Graph, num_layers: int) -> ir.Value | str:
    """The one [B, 1, S, T] bool mask every layer's `Where` (before its Softmax) selects with."""
    wheres = [n for n in graph if n.op_type == "Where"
              and any(c.op_type == "Softmax" for c, _ in n.outputs[0].uses())]
    masks = {id(n.inputs[0]): n.inputs[0] for n in wheres}
    if len(wheres) != num_layers or len(masks) != 1:
        return f"expected {num_layers} Where->Softmax nodes sharing one mask, found {len(wheres)} using {len(masks)}"
    return next(iter(masks.values()))


class GraphBuilder:
    """Inserts nodes and constants into the graph with traceable names."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def node(self, before: ir.Node, op: str, inputs, name: str, outputs: int = 1, **attributes) -> ir.Value | tuple:
        node = ir.node(op, inputs, attributes=attributes, num_outputs=outputs, name=name)
        self.graph.insert_before(before, node)
        for i, out in enumerate(node.outputs):
            out.name = name if outputs == 1 else f"{name}_{i}"
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)


class HalfTables:
    """RotaryEmbedding takes cos/sin [B, S, D/2]; the captured tables are [B, S, D] = [t, t]:
    one Slice per table, shared by every layer that uses it."""

    def __init__(self, builder: GraphBuilder, before: ir.Node):
        self.builder, self.before = builder, before
        self.halves: dict[int, ir.Value] = {}

    def half(self, table: ir.Value, head_dim: int) -> ir.Value:
        if id(table) not in self.halves:
            b = self.builder
            self.halves[id(table)] = b.node(
                self.before, "Slice", [table, b.const(f"attn/{table.name}_start", np.array([0], np.int64)),
                                       b.const(f"attn/{table.name}_end", np.array([head_dim // 2], np.int64)),
                                       b.const(f"attn/{table.name}_axis", np.array([-1], np.int64))],
                f"attn/{table.name}_half")
        return self.halves[id(table)]


class FuseAttentionOrt(PerLayerFusion):
    """Rewrite every layer's attention into RotaryEmbedding x2 + Attention (opset 23)."""

    def match(self, model: ir.Model) -> list[AttentionMatch | str]:
        mask = find_mask(model.graph, self.num_layers)
        return [mask] if isinstance(mask, str) else [match_attention(model.graph, i) for i in range(self.num_layers)]

    def rewrite(self, model: ir.Model, matches: list[AttentionMatch]) -> None:
        graph = model.graph
        mask = find_mask(graph, self.num_layers)
        b = GraphBuilder(graph)
        # Shared by all layers: the mask with no fully masked row, the zero-query flag, half tables.
        at = matches[0].o_proj  # layers are in graph order
        dtype = matches[0].q.dtype
        ones = b.node(at, "Cast", [mask], "attn/mask_float", to=dtype)  # [B, 1, S, T]
        seen = b.node(at, "ReduceMax", [ones, b.const("attn/last_axis", np.array([-1], np.int64))],
                      "attn/row_any", keepdims=1)  # [B, 1, S, 1], 1 where the query sees a key
        keep = b.node(at, "Squeeze", [seen, b.const("attn/head_axis", np.array([1], np.int64))],
                      "attn/query_keep")  # [B, S, 1]
        blind = b.node(at, "Equal", [seen, b.const("attn/zero", np.zeros((), dtype.numpy()))], "attn/row_blind")
        full_mask = b.node(at, "Or", [mask, blind], "attn/mask")  # [B, 1, S, T]
        tables = HalfTables(b, at)

        for m in matches:
            at = m.o_proj
            cos, sin = tables.half(m.cos, m.head_dim), tables.half(m.sin, m.head_dim)
            q = b.node(at, "Mul", [m.q, keep], m.name("query_keep"))
            q = b.node(at, "RotaryEmbedding", [q, cos, sin], m.name("rope_q"), num_heads=m.q_heads)
            k = b.node(at, "RotaryEmbedding", [m.k, cos, sin], m.name("rope_k"), num_heads=m.kv_heads)
            y, key, value = b.node(at, "Attention", [q, k, m.v, full_mask, m.past_key, m.past_value],
                                   m.name("attention"), outputs=3, q_num_heads=m.q_heads,
                                   kv_num_heads=m.kv_heads, scale=float(m.head_dim ** -0.5))
            ir.convenience.replace_all_uses_with(m.out, y)
            for old, new in ((m.present_key, key), (m.present_value, value)):
                index = graph.outputs.index(old)
                name, old.name = old.name, None
                new.name, new.shape, new.type = name, old.shape, old.type
                graph.outputs[index] = new
        require_opset(model, OPSET)
