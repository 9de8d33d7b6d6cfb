"""Alignment kernels against the naive per-expert layout (`align_reference`)."""

import pytest
import torch

from mixexport.kernels.align import align_reference, launch_align
from mixexport.kernels.configs import MAX_BLOCKS, WORKSPACE, evaluate


def _check(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    sorted_ids, expert_ids = launch_align(topk_ids.to(torch.int32).contiguous(), num_experts, block_m)
    ref_sorted, ref_experts = align_reference(topk_ids, num_experts, block_m)
    max_blocks = evaluate(MAX_BLOCKS, N=topk_ids.shape[0], K=topk_ids.shape[1], E=num_experts, BLOCK_M=block_m)
    assert sorted_ids.numel() == max_blocks * block_m and expert_ids.numel() == max_blocks
    # The AOT metadata's workspace formulas describe these same buffers.
    dims = {"N": topk_ids.shape[0], "K": topk_ids.shape[1], "E": num_experts, "BLOCK_M": block_m}
    assert evaluate(WORKSPACE["sorted_ids"], **dims) == 4 * sorted_ids.numel()
    assert evaluate(WORKSPACE["expert_ids"], **dims) == 4 * expert_ids.numel()
    assert ref_experts.numel() <= max_blocks  # the static grid bound holds
    torch.testing.assert_close(sorted_ids[: ref_sorted.numel()], ref_sorted, rtol=0, atol=0)
    torch.testing.assert_close(expert_ids[: ref_experts.numel()], ref_experts, rtol=0, atol=0)
    assert (expert_ids[ref_experts.numel():] == -1).all()


@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])  # 300 * 4 slots spans several 256-slot chunks
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (16, 4)])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_random(num_tokens, num_experts, top_k, block_m):
    gen = torch.Generator().manual_seed(num_tokens + num_experts)
    # Distinct experts per token, as routing produces.
    topk_ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    _check(topk_ids, num_experts, block_m)


@pytest.mark.parametrize("num_tokens", [7, 300])
def test_align_all_tokens_on_one_expert(num_tokens):
    _check(torch.full((num_tokens, 1), 3), 8, 16)


def test_align_empty_experts_between_busy_ones():
    # Experts 0, 2, 3, 5, 7 get nothing; expert 6 fills exactly one block (no padding).
    topk_ids = torch.tensor([[1, 4]] * 5 + [[6, 4]] * 16)
    _check(topk_ids, 8, 16)
