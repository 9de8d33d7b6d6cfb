"""Routing kernel against the MoE op's routing (`mixexport.model.moe.route`)."""

import pytest
import torch

from mixexport.kernels.routing import launch_routing
from mixexport.model.moe import route


def _check(logits: torch.Tensor, top_k: int, normalize: bool) -> None:
    weights, ids = launch_routing(logits.contiguous(), top_k, normalize)
    ref_weights, ref_ids = route(logits, top_k, normalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    torch.testing.assert_close(ids.long(), ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 4), (8, 2), (8, 4), (16, 1), (16, 2), (16, 4), (6, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_routing_matches_reference(num_experts, top_k, normalize):
    logits = torch.randn(37, num_experts, generator=torch.Generator().manual_seed(num_experts * 10 + top_k))
    _check(logits, top_k, normalize)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_routing_half_logits(dtype):
    logits = torch.randn(23, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check(logits, 2, True)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_routing_exact_ties_go_to_lower_index(top_k):
    # Integer logits from a tiny set make many exact ties; equal logits give bit-equal probabilities.
    logits = torch.randint(0, 3, (64, 8), generator=torch.Generator().manual_seed(2)).float()
    logits[0] = 1.0  # all eight tied: experts 0..k-1
    logits[1] = torch.tensor([0.0, 2.0, 1.0, 2.0, 2.0, 0.0, 1.0, 2.0])  # ties at the top: 1, 3, 4, 7
    _check(logits, top_k, True)
    _, ids = launch_routing(logits, top_k, True)
    assert ids[0].tolist() == list(range(top_k))
    assert ids[1].tolist() == [1, 3, 4, 7][:top_k]


def test_routing_underflowed_probabilities_tie_to_lower_index():
    # Probabilities that underflow to exactly 0 still rank by index, and padding lanes never win.
    logits = torch.full((3, 5), -1e4)
    logits[:, 4] = 0.0
    _check(logits, 4, False)
    _, ids = launch_routing(logits, 4, False)
    assert ids[0].tolist() == [4, 0, 1, 2]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routing_non_finite_logits(top_k, normalize):
    # Rows without a softmax (a NaN, a +inf, two +inf, only -inf) between ordinary rows, and -inf
    # logits that are just probability 0; 20 rows span two routing programs.
    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(5))
    logits[1, 2] = NAN
    logits[4, 5] = INF
    logits[7, [0, 3]] = INF
    logits[9] = -INF
    logits[11, [1, 4]] = -INF
    logits[17, 0] = -INF
    logits[17, 1] = NAN
    _check(logits, top_k, normalize)
    weights, ids = launch_routing(logits, top_k, normalize)
    no_softmax = [1, 4, 7, 9, 17]
    assert ids[no_softmax].tolist() == [list(range(top_k))] * len(no_softmax)
    assert weights[no_softmax].isnan().all()
    ordinary = [r for r in range(20) if r not in no_softmax]
    assert weights[ordinary].isfinite().all() and ((ids >= 0) & (ids < 6)).all()
    assert 1 not in ids[11, :2].tolist() and 4 not in ids[11, :2].tolist()  # -inf: probability 0


def test_reference_route_is_unchanged_for_finite_logits():
    # The non-finite rule must not move a single bit of the finite case: compare with the plain
    # stable sort the reference used before the rule existed.
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(6))
    logits[3] = 1.0  # an all-tie row
    weights, experts = route(logits, 2, True)
    probs = torch.softmax(logits, dim=-1)
    plain_w, plain_e = torch.sort(probs, dim=-1, descending=True, stable=True)
    plain_w = plain_w[:, :2] / plain_w[:, :2].sum(dim=-1, keepdim=True)
    assert torch.equal(experts, plain_e[:, :2]) and torch.equal(weights, plain_w)
