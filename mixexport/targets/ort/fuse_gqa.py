"""The shared-buffer KV layout: each layer's attention as one com.microsoft.GroupQueryAttention
whose past and present are the same static buffer, updated in place (ort target, `--kv-layout shared`).

onnxruntime-genai runs such a graph with `past_present_share_buffer: true`, what its own model
builder writes and what CUDA graphs need: it allocates every `past_key_values.{i}.*` once as
[B, KVH, M, D] (M: the run's max_length) and binds `present.{i}.*` to the same memory, so a step
writes only its new keys. What genai 0.18 feeds in this mode, seen by logging its inputs:
`attention_mask` [B, T] with T the tokens so far (it grows by one per step; it is not M long),
`position_ids` [B, S], the past buffers [B, KVH, M, D] every step; it reads back only the logits.

GroupQueryAttention's contract, which this layout inherits (onnxruntime 1.32, CPU):
- Rows are packed at the front: row b's tokens fill buffer slots [0, seqlens_k[b]], the S new
  ones being the last S of them. seqlens_k = sum(attention_mask[b]) - 1 and
  total_sequence_length = T, as genai's builder wires them; so a row may end in padding (a
  shorter prompt of a batch, the slots then overwritten by its next tokens), but it may not start
  with padding: a left-padded row would be read as right-padded, wrong keys with no error.
  `passes.check_attention_mask` makes the graph refuse a mask whose first column is not all ones.
- batch > 1 with S > 1 and a past (chunked prefill of a batch) is refused by the CPU kernel
  ("batch_size must be 1 when sequence_length > 1 and past context is given"); batch 1 chunks
  and batch > 1 prefills and decodes run. T > M is refused by the kernel too.
- Padding slots hold whatever was computed there; only slots [0, seqlens_k] are the cache.

RoPE stays in front as opset-23 RotaryEmbedding fed from `position_ids` (as the concat layout's
fusion does) rather than GroupQueryAttention's `do_rotary`: the captured cos/sin tables are
reused unchanged (no second RoPE implementation with its own cos/sin cache of max-context
length, which position_ids would no longer feed), and the fused rotary bought nothing measurable:
small preset, batch 1, 256 decode steps interleaved in one process, 2 threads, buffers bound in
place as genai binds them, medians 32.8 ms (RotaryEmbedding) and 32.6 ms (do_rotary) against
32.5 ms for the concat graph, on a shared 2-core machine at load 8 (so only a bound: nothing
there is faster by more than the noise); greedy tokens of all three equal over the 256 steps.

The pass finds each layer's attention as `fuse_attention` does (`match_attention`) and replaces
everything between the projections and o_proj; the captured mask (causal, padding, window) is no
longer read: GroupQueryAttention derives causality from seqlens_k, and a sliding window is its
`local_window_size`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mixexport import graph_io
from mixexport.passes.base import PerLayerFusion, require_opset
from mixexport.targets.ort.fuse_attention import (OPSET, AttentionMatch, GraphBuilder, HalfTables, find_mask,
                                                  match_attention)
from mixexport.targets.ort.lowering import ORT_DOMAIN

MASK = "attention_mask"


class FuseGroupQueryAttentionOrt(PerLayerFusion):
    """Rewrite every layer's attention into RotaryEmbedding x2 + com.microsoft.GroupQueryAttention
    over static, shared past/present buffers [B, KVH, kv_buffer_length, D]."""

    def __init__(self, num_layers: int, sliding_window: int | None = None):
        """
        Args:
            num_layers: decoder layers (one attention each).
            sliding_window: the model's window W (a key j is seen from position i when i - j < W),
                None for full attention.
        """
        super().__init__(num_layers)
        # onnxruntime 1.32's local_window_size W has Hugging Face's meaning (i - j < W): the
        # shared-layout parity test with a window shorter than its sequences passes with W and
        # fails with W - 1 and W + 1.
        self.local_window_size = -1 if sliding_window is None else sliding_window

    def match(self, model: ir.Model) -> list[AttentionMatch | str]:
        graph = model.graph
        mask = find_mask(graph, self.num_layers)  # the captured attention this pass replaces
        if isinstance(mask, str):
            return [mask]
        if not any(v.name == MASK for v in graph.inputs):
            return [f"the graph has no {MASK} input to derive seqlens_k from"]
        return [match_attention(graph, i) for i in range(self.num_layers)]

    def rewrite(self, model: ir.Model, matches: list[AttentionMatch]) -> None:
        graph = model.graph
        mask = next(v for v in graph.inputs if v.name == MASK)
        b = GraphBuilder(graph)
        at = matches[0].o_proj  # layers are in graph order
        # seqlens_k [B] int32: each row's tokens so far, minus one; total_sequence_length: T, a
        # scalar int32 (genai's builder computes both from the mask in the same way).
        count = b.node(at, "ReduceSum", [mask, b.const("gqa/row_axis", np.array([1], np.int64))], "gqa/row_tokens",
                       keepdims=0)  # [B]
        last = b.node(at, "Sub", [count, b.const("gqa/one", np.array(1, np.int64))], "gqa/last_slot")
        seqlens = b.node(at, "Cast", [last], "gqa/seqlens_k", to=ir.DataType.INT32)
        total = b.node(at, "Shape", [mask], "gqa/mask_length", start=1, end=2)  # [1]
        total = b.node(at, "Squeeze", [total], "gqa/total_length")  # scalar
        total = b.node(at, "Cast", [total], "gqa/total_sequence_length", to=ir.DataType.INT32)
        tables = HalfTables(b, at)
        buffer_dim = ir.SymbolicDim(graph_io.KV_BUFFER)
        for m in matches:
            at = m.o_proj
            cos, sin = tables.half(m.cos, m.head_dim), tables.half(m.sin, m.head_dim)
            q = b.node(at, "RotaryEmbedding", [m.q, cos, sin], m.name("rope_q"), num_heads=m.q_heads)
            k = b.node(at, "RotaryEmbedding", [m.k, cos, sin], m.name("rope_k"), num_heads=m.kv_heads)
            node = ir.node("GroupQueryAttention", [q, k, m.v, m.past_key, m.past_value, seqlens, total],
                           attributes={"num_heads": m.q_heads, "kv_num_heads": m.kv_heads,
                                       "scale": float(m.head_dim ** -0.5), "local_window_size": self.local_window_size,
                                       "do_rotary": 0},
                           domain=ORT_DOMAIN, num_outputs=3, name=m.name("group_query_attention"))
            graph.insert_before(at, node)
            y, key, value = node.outputs
            y.name = m.name("group_query_attention")
            ir.convenience.replace_all_uses_with(m.out, y)
            for past in (m.past_key, m.past_value):
                past.shape = ir.Shape([past.shape[0], past.shape[1], buffer_dim, past.shape[3]])
            for old, new, past in ((m.present_key, key, m.past_key), (m.present_value, value, m.past_value)):
                index = graph.outputs.index(old)
                name, old.name = old.name, None
                new.name, new.shape, new.type = name, ir.Shape(list(past.shape)), old.type
                graph.outputs[index] = new
        require_opset(model, OPSET)
        model.opset_imports.setdefault(ORT_DOMAIN, 1)

