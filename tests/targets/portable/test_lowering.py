"""lower_moe_portable: standard ONNX ops only, routed by TopK, numerically the reference."""

from __future__ import annotations

import numpy as np
import pytest

from mixexport.targets.portable.lowering import LowerMoEToPortable
from passes.single_moe import check_non_finite_rule, moe_weights, reference, run, single_moe_model, tied_logits


def test_rewrite_uses_standard_ops_only():
    w_gate_up, w_down = moe_weights(4, 8, 6)
    model = single_moe_model(w_gate_up, w_down, top_k=2, normalize=True, layer=5)
    result = LowerMoEToPortable()(model)
    assert result.modified and result.rewrites == 1
    nodes = list(model.graph.all_nodes())
    assert {n.domain for n in nodes} == {""}
    top = [n.op_type for n in model.graph]
    assert top.count("TopK") == 1 and top.count("ScatterElements") == 1 and top.count("Softmax") == 1
    assert top.count("If") == 4  # one branch per expert, run only when a token chose it
    assert all(n.name.startswith("layers.5.moe.") for n in nodes)
    # names unique across the main graph and every branch (ONNX requires it)
    outputs = [v.name for n in nodes for v in n.outputs]
    assert len(outputs) == len(set(outputs))
    # each expert's weights are their own initializer, pre-transposed for MatMul; the stacks are gone
    shapes = {name: tuple(v.shape) for name, v in model.graph.initializers.items()}
    assert shapes == {**{f"layers.5.moe.experts.{e}.w_gate_up_t": (8, 12) for e in range(4)},
                      **{f"layers.5.moe.experts.{e}.w_down_t": (6, 8) for e in range(4)}}
    for e in range(4):
        np.testing.assert_array_equal(model.graph.initializers[f"layers.5.moe.experts.{e}.w_gate_up_t"]
                                      .const_value.numpy(), w_gate_up[e].T)
        np.testing.assert_array_equal(model.graph.initializers[f"layers.5.moe.experts.{e}.w_down_t"]
                                      .const_value.numpy(), w_down[e].T)


def test_an_expert_nobody_chose_is_skipped():
    """Every token on expert 0 (top-1): the other experts take their empty branch, still exact."""
    w_gate_up, w_down = moe_weights(4, 8, 6)
    model = single_moe_model(w_gate_up, w_down, top_k=1, normalize=True)
    LowerMoEToPortable()(model)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    logits = np.tile(np.array([[5.0, 0.0, 0.0, 0.0]], np.float32), (5, 1))
    np.testing.assert_allclose(run(model, x, logits), reference(x, logits, w_gate_up, w_down, 1, True),
                               atol=1e-5, rtol=1e-4)


def test_normalize_off_has_no_division():
    model = single_moe_model(*moe_weights(4, 8, 6), top_k=2, normalize=False)
    LowerMoEToPortable()(model)
    assert "Div" not in [n.op_type for n in model.graph]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (4, 2), (8, 1), (8, 2), (8, 8)])
def test_numerics_match_reference_with_ties(experts, top_k, normalize):
    h, i, n = 16, 12, 11
    w_gate_up, w_down = moe_weights(experts, h, i, seed=experts * 10 + top_k)
    x = np.random.default_rng(2).standard_normal((n, h)).astype(np.float32)
    logits = tied_logits(n, experts)  # ONNX TopK breaks ties toward the lower index, as the contract does
    model = single_moe_model(w_gate_up, w_down, top_k=top_k, normalize=normalize)
    LowerMoEToPortable()(model)
    got = run(model, x, logits)
    np.testing.assert_allclose(got, reference(x, logits, w_gate_up, w_down, top_k, normalize), atol=1e-5, rtol=1e-4)


def test_numerics_fp16():
    w_gate_up, w_down = moe_weights(8, 16, 12, dtype=np.float16)
    x = np.random.default_rng(3).standard_normal((6, 16)).astype(np.float16)
    logits = np.random.default_rng(4).standard_normal((6, 8)).astype(np.float16)
    model = single_moe_model(w_gate_up, w_down, top_k=2, normalize=True)
    LowerMoEToPortable()(model)
    got = run(model, x, logits)
    assert got.dtype == np.float16
    want = reference(x, logits, w_gate_up, w_down, 2, True)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=1e-2, rtol=1e-2)



def test_non_finite_router_logits_follow_the_moe_rule():
    """Softmax + TopK give a token without a softmax NaN weights, which must count as chosen."""
    check_non_finite_rule(LowerMoEToPortable())
