"""fuse_qkv_ort: one MatMul on the concatenated weight per layer, its lazy weight, the reasons it
declines, and numerics against the graph without it (both attention layouts' passes feed it)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from artifact.shared import captured_with_weights
from mixexport import graph_io
from mixexport.targets import backend
from mixexport.targets.ort.fuse_attention import FuseAttentionOrt
from mixexport.targets.ort.fuse_qkv import FuseQkvOrt
from passes.ort_graphs import assert_fused_matches_unfused, ort_graph, session
from targets.ort.test_fuse_attention import CONFIG, LAYERS

Q, KV = CONFIG.num_attention_heads * CONFIG.head_dim, CONFIG.num_key_value_heads * CONFIG.head_dim


@pytest.fixture(scope="module")
def captured(checkpoint_factory):
    model, _ = captured_with_weights(checkpoint_factory(CONFIG))
    return model


@pytest.mark.parametrize("kv_layout", ["concat", "shared"])
def test_one_matmul_and_split_per_layer_on_a_lazy_concatenated_weight(captured, kv_layout):
    model = captured.clone()
    report = backend("ort").lower(model, LAYERS, kv=graph_io.KvLayout(kv_layout, CONFIG.sliding_window))
    assert report["fuse_qkv_ort"] == LAYERS
    fused = [n for n in model.graph if n.name.endswith("ort/qkv_proj")]
    assert [n.name for n in fused] == [f"layers.{i}.self_attn.ort/qkv_proj" for i in range(LAYERS)]
    names = set(model.graph.initializers)
    assert not {f"layers.{i}.self_attn.{p}_proj.weight_t" for i in range(LAYERS) for p in "qkv"} & names
    weight = model.graph.initializers["layers.0.self_attn.qkv_proj.weight_t"]
    assert fused[0].inputs[1] is weight and tuple(weight.shape) == (CONFIG.hidden_size, Q + 2 * KV)
    assert isinstance(weight.const_value, ir.LazyTensor)  # written when saved, read from the checkpoint then
    split = next(node for node, _ in fused[0].outputs[0].uses())
    assert split.op_type == "Split" and split.inputs[1].const_value.numpy().tolist() == [Q, KV, KV]
    # q, k, v reach what the attention fusion built on them
    consumers = [sorted(n.op_type for n, _ in out.uses()) for out in split.outputs]
    attention = "Attention" if kv_layout == "concat" else "GroupQueryAttention"
    assert consumers == [["Mul" if kv_layout == "concat" else "RotaryEmbedding"], ["RotaryEmbedding"], [attention]]
    # only projections were fused: o_proj stays, lm_head stays
    assert Counter(n.op_type for n in model.graph)["MatMul"] == 2 * LAYERS + 1


def test_weight_is_q_k_v_side_by_side(captured):
    plain = ort_graph(captured, FuseAttentionOrt(LAYERS))
    parts = [plain.graph.initializers[f"layers.1.self_attn.{p}_proj.weight_t"].const_value.numpy() for p in "qkv"]
    fused = ort_graph(captured, FuseAttentionOrt(LAYERS), FuseQkvOrt(LAYERS))
    np.testing.assert_array_equal(fused.graph.initializers["layers.1.self_attn.qkv_proj.weight_t"].const_value.numpy(),
                                  np.concatenate(parts, axis=1))


def test_declines_a_projection_on_another_input(captured):
    model = ort_graph(captured, FuseAttentionOrt(LAYERS))
    k_proj = next(node for node, _ in model.graph.initializers["layers.1.self_attn.k_proj.weight_t"].uses())
    other = ir.node("Identity", [k_proj.inputs[0]], name="other_input")
    model.graph.insert_before(k_proj, other)
    k_proj.replace_input_with(0, other.outputs[0])
    fusion = FuseQkvOrt(LAYERS)
    result = fusion(model)
    assert result.rewrites == 0 and not result.modified
    assert fusion.reason == "layer 1: q, k and v projections do not share one input"
    assert not any(n.name.endswith("ort/qkv_proj") for n in model.graph)  # all or nothing: layer 0 untouched
    steps = [name for name, _ in backend("ort").lowering(LAYERS)]
    assert steps.index("fuse_qkv_ort") > steps.index("fuse_attention_ort")  # which finds q, k, v the same way


@pytest.fixture(scope="module")
def sessions(captured, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse_qkv")
    return (session(ort_graph(captured, FuseAttentionOrt(LAYERS)), root / "unfused.onnx"),
            session(ort_graph(captured, FuseAttentionOrt(LAYERS), FuseQkvOrt(LAYERS)), root / "fused.onnx"))


@pytest.mark.parametrize("batch,seq,past,pad", [
    (1, 1, 9, 0),  # decode, batch 1
    (2, 7, 0, 3),  # left-padded prefill
    (2, 3, 5, 2),  # chunked prefill with a past
])
def test_numerics_match_unfused(sessions, batch, seq, past, pad):
    assert_fused_matches_unfused(CONFIG, sessions, batch, seq, past, pad)
