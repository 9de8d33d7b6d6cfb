"""fuse_attention_ort: the ops it leaves, and numerics against the unfused ort graph in onnxruntime.

The decoder has a sliding window shorter than the sequences below, so window, padding and causal
masking all matter; the left-padded prefill has fully masked query rows.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from artifact.shared import captured_with_weights
from mixexport.checkpoint import MixtralConfig
from mixexport.errors import InternalError
from mixexport.passes.check_attention_mask import CHECK_PREFIX
from mixexport.targets import backend
from mixexport.targets.ort.fuse_attention import FuseAttentionOrt
from passes.ort_graphs import decoder_feeds, ort_graph, run_both, session

# GQA (4 query heads on 2 KV heads), head_dim != hidden/heads, and a window shorter than the sequences.
CONFIG = MixtralConfig(
    hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    vocab_size=97, rope_theta=1e4, dtype="float32", max_position_embeddings=256, sliding_window=4)
LAYERS = CONFIG.num_hidden_layers


@pytest.fixture(scope="module")
def captured(checkpoint_factory):
    model, _ = captured_with_weights(checkpoint_factory(CONFIG))
    return model


@pytest.fixture(scope="module")
def sessions(captured, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse_attention")
    return (session(ort_graph(captured), root / "unfused.onnx"),
            session(ort_graph(captured, FuseAttentionOrt(LAYERS)), root / "fused.onnx"))


@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_rewrite_leaves_fused_ops(captured, provider):
    model = captured.clone()
    report = backend("ort").lower(model, LAYERS, provider=provider)
    assert report["fuse_attention_ort"] == LAYERS
    # the attention mask's shape check (check_attention_mask) has a Where of its own
    ops = Counter(n.op_type for n in model.graph if not n.name.startswith(CHECK_PREFIX))
    assert ops["Attention"] == LAYERS and ops["RotaryEmbedding"] == 2 * LAYERS
    # the attention's softmax and mask are gone; the MoE keeps its router softmax (cpu: the
    # sparse form's routing; cuda: the fused node's non-finite-logits rule, with its Where)
    outside_moe = Counter(n.op_type for n in model.graph if ".moe." not in n.name
                          and not n.name.startswith(CHECK_PREFIX))
    assert outside_moe["Softmax"] == 0 and outside_moe["Where"] == 0 and outside_moe["Neg"] == 0
    assert ops["Softmax"] == LAYERS and ops["Where"] == (LAYERS if provider == "cuda" else 0)
    assert model.opset_imports[""] == 23
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert attention.name == "layers.0.self_attn.ort/attention"
    assert {k: a.value for k, a in attention.attributes.items()} == {
        "q_num_heads": CONFIG.num_attention_heads, "kv_num_heads": CONFIG.num_key_value_heads,
        "scale": pytest.approx(CONFIG.head_dim ** -0.5)}
    assert [v.name for v in attention.outputs[1:]] == ["present.0.key", "present.0.value"]
    # weights were re-wired, not read: still the lazy tensors capture attached
    assert isinstance(model.graph.initializers["layers.0.self_attn.o_proj.weight_t"].const_value, ir.LazyTensor)


def test_portable_and_trt_are_not_fused(captured):
    for target in ("portable", "trt"):
        model = captured.clone()
        report = backend(target).lower(model, LAYERS)
        assert "fuse_attention_ort" not in report
        assert model.opset_imports[""] == 18
        assert not any(n.op_type in ("Attention", "RotaryEmbedding") for n in model.graph)


def test_declines_with_reason_and_pipeline_fails(captured):
    model = ort_graph(captured)
    model.graph.initializers["layers.1.self_attn.k_proj.weight_t"].name = "renamed"
    fusion = FuseAttentionOrt(LAYERS)
    result = fusion(model)
    assert result.rewrites == 0 and not result.modified
    assert "no initializer layers.1.self_attn.k_proj.weight_t" in fusion.reason
    assert not any(n.op_type == "Attention" for n in model.graph)  # all or nothing: layer 0 untouched
    broken = captured.clone()
    broken.graph.initializers["layers.1.self_attn.k_proj.weight"].name = "renamed"
    with pytest.raises(InternalError, match=r"fuse_attention_ort made 0 rewrites, expected 2 \(one per layer\): "
                                            r"no initializer layers.1.self_attn.k_proj.weight_t"):
        backend("ort").lower(broken, LAYERS)



def test_declines_a_rope_that_is_not_rotate_half(captured):
    model = ort_graph(captured)
    rotated = next(v for v in model.graph.outputs if v.name == "present.1.key").producer().inputs[1]
    # x * cos + Concat(x2, x1) * sin: rotate_half without its Neg is not what RotaryEmbedding computes
    neg = next(m.inputs[0].producer() for m in (v.producer() for v in rotated.producer().inputs)
               if m.inputs[0].producer().op_type == "Concat").inputs[0].producer()
    neg.op_type = "Identity"
    fusion = FuseAttentionOrt(LAYERS)
    assert fusion(model).rewrites == 0
    assert fusion.reason == (f"layer 1: rotated key {rotated.name} is not x * cos + rotate_half(x) * sin: "
                             "OpType mismatch: expected Neg, got Identity.")

@pytest.mark.parametrize("batch,seq,past,pad", [
    (2, 7, 0, 3),  # left-padded prefill: padding queries see no key at all
    (2, 1, 7, 3),  # decode
    (1, 1, 9, 0),  # decode, batch 1, past longer than the window
    (2, 3, 5, 2),  # chunked prefill with a past, batch > 1 (what ORT's CPU GroupQueryAttention refuses)
    (3, 4, 6, 7),  # a row whose whole past and first new token are padding
])
def test_numerics_match_unfused(sessions, batch, seq, past, pad):
    feed = decoder_feeds(CONFIG, batch, seq, past, pad, np.random.default_rng(batch * 100 + seq * 10 + past))
    want, got = run_both(*sessions, feed)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert not np.isnan(got[name]).any(), name
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4, err_msg=name)
