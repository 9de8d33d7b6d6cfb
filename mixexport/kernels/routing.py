"""Routing kernel: softmax over E, top-k with ties to the lower expert index, optional renormalization.

Its naive reference is `mixexport.model.moe.route`, the MoE op's own routing (one source of truth).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixexport.kernels.configs import ROUTING_BLOCK_T, cdiv


@triton.jit
def routing_kernel(
    logits_ptr,  # [N, E] any float dtype, contiguous
    weights_ptr,  # [N, K] fp32 out
    ids_ptr,  # [N, K] int32 out
    N,
    E,
    K,
    normalize,  # int32 0/1: divide the kept probabilities by their sum
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # One program routes BLOCK_T tokens; a token's E logits sit in one register row, so the softmax
    # and the k arg-max passes never leave registers. The logits are read once, the outputs written once.
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < N
    col_ok = cols < E
    logits = tl.load(logits_ptr + rows[:, None] * E + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    # Rows past N would be all -inf and turn into NaN; give them finite values (never stored).
    logits = tl.where(row_ok[:, None], logits, 0.0)
    shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = shifted / tl.sum(shifted, axis=1)[:, None]
    # A NaN or +inf logit, or a row of -inf, leaves the row without a softmax (NaN, however max
    # treats NaN). The op routes such a token to experts 0..K-1 with NaN weights (see `route`):
    # rank it as all ties, so every id stays in [0, E), and store NaN for its weights below.
    no_softmax = tl.max((probs != probs).to(tl.int32), axis=1) > 0
    probs = tl.where(no_softmax[:, None], 0.0, probs)
    # Padding lanes rank below every real expert, even one whose probability underflowed to 0.
    probs = tl.where(col_ok[None, :], probs, -1.0)

    # K is a runtime value, so the k winners cannot be held in a register tensor: a first pass
    # sums them for the renormalization, a second selects them again and stores. Each pass takes
    # the row max and, among lanes equal to it, the lowest index (the tie rule).
    denom = tl.full((BLOCK_T,), 1.0, tl.float32)
    if normalize != 0:
        left = probs
        denom = tl.zeros((BLOCK_T,), tl.float32)
        for _ in range(K):
            top = tl.max(left, axis=1)
            top_id = tl.min(tl.where(left == top[:, None], cols[None, :], BLOCK_E), axis=1)
            denom += top
            left = tl.where(cols[None, :] == top_id[:, None], -2.0, left)
    remaining = probs
    for j in range(K):
        best = tl.max(remaining, axis=1)
        best_id = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_E), axis=1)
        tl.store(weights_ptr + rows * K + j, tl.where(no_softmax, float("nan"), best / denom), mask=row_ok)
        tl.store(ids_ptr + rows * K + j, best_id.to(tl.int32), mask=row_ok)
        remaining = tl.where(cols[None, :] == best_id[:, None], -2.0, remaining)


def launch_routing(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the routing kernel.

    Args:
        router_logits: [N, E] contiguous, on the kernel's device.
        top_k: experts per token, 1 <= top_k <= E.
        normalize: renormalize the kept probabilities to sum to 1.

    Returns:
        (weights [N, K] float32, expert ids [N, K] int32), in descending weight order.
    """
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    grid = (cdiv(num_tokens, ROUTING_BLOCK_T),)
    routing_kernel[grid](router_logits, weights, ids, num_tokens, num_experts, top_k, int(normalize),
                         BLOCK_T=ROUTING_BLOCK_T, BLOCK_E=triton.next_power_of_2(num_experts))
    return weights, ids
