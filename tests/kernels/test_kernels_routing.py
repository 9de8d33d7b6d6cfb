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
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)


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
