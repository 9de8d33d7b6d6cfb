"""Make every target graph refuse an `attention_mask` that is not [B, P+S].

The captured graph takes the key length from the mask's own shape and broadcasts the mask over
the attention scores, so a mask of the wrong length (Polygraphy's CLI feeds length 1 for every
dynamic dimension) or of batch 1 is silently broadcast over all keys or all rows: wrong logits,
no error. onnxruntime's fused Attention (ort) refuses a wrong length but broadcasts a batch-1 mask
too. This pass puts the contract into the graph, before the mask's first use:

    expected = [Shape(input_ids)[0], Shape(past_key_values.0.key)[2] + Shape(input_ids)[1]]   [B, P+S]
    shape    = Shape(attention_mask)
    mask     = Reshape(attention_mask, Where(shape == expected, shape, shape + 1))

With a mask of the right shape the Reshape is an identity, so outputs are bit-identical. With a
wrong dimension the target grows that dimension by one, so its element count differs from the
mask's (every other dimension being non-zero) and the Reshape fails, in onnxruntime and TensorRT
alike, naming this node.

Why not the plainer `Reshape(attention_mask, expected)`: a Reshape only checks the element count,
and onnxruntime's graph optimizer rewrites a target built by `Concat` of shape slices into `0` /
`-1` entries, trusting that dimensions with the same symbolic name agree, which is the very thing
to check. A `Where` target matches none of its rewrites and depends on run-time shapes only.

A graph with the shared-buffer KV layout (its past is `graph_io.KV_BUFFER` long) has another
mask contract, checked the same way: [B, T] with S <= T <= M and no row starting with padding
(`_shared_buffer_checks`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mixexport import graph_io
from mixexport.errors import InternalError
from mixexport.passes.base import RewriteResult

MASK = "attention_mask"
CHECK_PREFIX = f"{MASK}.check/"  # names of the check's nodes
CHECKED_MASK = f"{CHECK_PREFIX}is_batch_by_past_plus_sequence"  # the checked mask every user reads
INT64 = ir.DataType.INT64


class CheckAttentionMask(ir.passes.InPlacePass):
    """Route every use of `attention_mask` through the checking Reshape (one rewrite per graph).

    A graph without an `attention_mask` input (a lone MoE block in a test) has nothing to check: 0
    rewrites. A decoder graph with the mask but without `input_ids` or a past input is a bug.
    """

    def call(self, model: ir.Model) -> RewriteResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        mask = inputs.get(MASK)
        if mask is None:
            return RewriteResult(model, False, rewrites=0)
        past_name = graph_io.past_names(0)[0]
        ids, past = inputs.get("input_ids"), inputs.get(past_name)
        if ids is None or past is None:
            raise InternalError(f"graph has {MASK} but no input_ids or {past_name} input to check it against")
        uses = list(mask.uses())
        if not uses:
            return RewriteResult(model, False, rewrites=0)

        def node(op: str, args: list[ir.Value], name: str, **attributes) -> ir.Node:
            n = ir.node(op, args, attributes=attributes, name=f"{CHECK_PREFIX}{name}")
            n.outputs[0].name = n.name
            return n

        one = node("Constant", [], "one", value=ir.tensor(np.array([1], np.int64), name=f"{CHECK_PREFIX}one"))
        shape = node("Shape", [mask], "shape")  # [2]
        if _is_shared_buffer(past):
            checks = _shared_buffer_checks(node, mask, ids, past, shape, one)
        else:
            past_len = node("Shape", [past], "past_length", start=2, end=3)  # [1]: P
            seq_len = node("Shape", [ids], "sequence_length", start=1, end=2)  # [1]: S
            batch = node("Shape", [ids], "batch", start=0, end=1)  # [1]: B
            total = node("Add", [past_len.outputs[0], seq_len.outputs[0]], "total_length")  # [1]: P + S
            expected = node("Concat", [batch.outputs[0], total.outputs[0]], "expected_shape", axis=0)  # [2]
            checks = [past_len, seq_len, batch, total, expected,
                      node("Equal", [shape.outputs[0], expected.outputs[0]], "is_expected")]  # [2] bool
        same = checks[-1]
        grown = node("Add", [shape.outputs[0], one.outputs[0]], "grown_shape")
        target = node("Where", [same.outputs[0], shape.outputs[0], grown.outputs[0]], "target_shape")
        checked = node("Reshape", [mask, target.outputs[0]], CHECKED_MASK[len(CHECK_PREFIX):])
        checked.outputs[0].type = ir.TensorType(INT64)  # no static shape: it is what is checked
        # Everything the check reads is a graph input, so it can go first.
        graph.insert_before(next(iter(graph)),
                            [one, shape, *checks, grown, target, checked])
        for user, index in uses:
            user.replace_input_with(index, checked.outputs[0])
        return RewriteResult(model, True, rewrites=1)


def _is_shared_buffer(past: ir.Value) -> bool:
    """Whether the graph keeps its KV cache in static shared buffers (`graph_io.KV_LAYOUTS`)."""
    return past.shape is not None and len(past.shape) == 4 and isinstance(past.shape[2], ir.SymbolicDim) \
        and past.shape[2].value == graph_io.KV_BUFFER


def _shared_buffer_checks(node, mask: ir.Value, ids: ir.Value, past: ir.Value, shape: ir.Node,
                          one: ir.Node) -> list[ir.Node]:
    """The shared layout's mask contract (`targets.ort.fuse_gqa`): [B, T] with S <= T <= M (the
    buffer length), every row's tokens packed at its front, so its first column is all ones. A
    left-padded mask would otherwise be read as right-padded: wrong keys, no error. The last
    node is the [2] bool `is_expected` the Where reads (both entries false on any failure)."""
    zero = node("Constant", [], "zero", value=ir.tensor(np.array([0], np.int64), name=f"{CHECK_PREFIX}zero"))
    batch = node("Shape", [ids], "batch", start=0, end=1)  # [1]: B
    seq_len = node("Shape", [ids], "sequence_length", start=1, end=2)  # [1]: S
    buffer_len = node("Shape", [past], "buffer_length", start=2, end=3)  # [1]: M
    length = node("Shape", [mask], "length", start=1, end=2)  # [1]: T
    rows = node("Shape", [mask], "rows", start=0, end=1)  # [1]
    first = node("Slice", [mask, zero.outputs[0], one.outputs[0], one.outputs[0]], "first_column")  # [B, 1]
    lowest = node("ReduceMin", [first.outputs[0]], "first_column_min", keepdims=0)  # scalar: 1 unless a row starts padded
    conditions = [
        node("Equal", [rows.outputs[0], batch.outputs[0]], "is_batch"),
        node("GreaterOrEqual", [length.outputs[0], seq_len.outputs[0]], "holds_sequence"),
        node("LessOrEqual", [length.outputs[0], buffer_len.outputs[0]], "fits_buffer"),
        node("Equal", [lowest.outputs[0], one.outputs[0]], "rows_start_with_tokens"),
    ]
    ok = conditions[0]
    made = [zero, batch, seq_len, buffer_len, length, rows, first, lowest, *conditions]
    for i, condition in enumerate(conditions[1:]):
        ok = node("And", [ok.outputs[0], condition.outputs[0]], f"all_{i}")
        made.append(ok)
    both = node("Concat", [ok.outputs[0], ok.outputs[0]], "is_expected", axis=0)  # [2]
    return [*made, both]
