"""Top-k reduction: out[n] = sum_s sum_j y[s, n*K + j], in a fixed order, no atomics, cast to x's dtype.

A float sum depends on its order; atomics would make the order (and the result) vary from run to run.
Each program owns whole output elements and adds the split_k x K rows (the down GEMM's splits of I,
then the token's experts) in order s = 0.., j = 0..K-1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixexport.kernels.configs import GRIDS, REDUCE_BLOCK_H, evaluate


@triton.jit
def topk_reduce_kernel(
    y_ptr,  # [split_k, N*K, H] fp32 weighted expert outputs
    out_ptr,  # [N, H] out, x's dtype
    num_slots,  # N*K
    H,
    K,
    split_k,  # the down GEMM tile's SPLIT_K (runtime: one compiled reduction serves every tile)
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    num_h = tl.cdiv(H, BLOCK_H)
    token = (pid // num_h).to(tl.int64)
    cols = (pid % num_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for s in range(split_k):
        for j in range(K):
            acc += tl.load(y_ptr + (s * num_slots + token * K + j) * H + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def launch_topk_reduce(y: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's K weighted expert outputs over the down GEMM's splits.

    Args:
        y: [SPLIT_K, N*K, H] float32, from `launch_down`.
        top_k: K.
        dtype: output dtype (x's).

    Returns:
        [N, H] in dtype.
    """
    split_k, num_slots, hidden = y.shape
    num_tokens = num_slots // top_k
    out = torch.empty(num_tokens, hidden, dtype=dtype, device=y.device)
    grid = (evaluate(GRIDS["topk_reduce"], N=num_tokens, H=hidden, BLOCK_H=REDUCE_BLOCK_H),)
    topk_reduce_kernel[grid](y, out, num_slots, hidden, top_k, split_k, BLOCK_H=REDUCE_BLOCK_H)
    return out


def topk_reduce_reference(y: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Naive reduction: y [SPLIT_K, N*K, H] viewed as [SPLIT_K, N, K, H], summed in the kernel's order.

    Args:
        y: [SPLIT_K, N*K, H].
        top_k: K.
        dtype: output dtype.

    Returns:
        [N, H] in dtype.
    """
    split_k, num_slots, hidden = y.shape
    parts = y.reshape(split_k, num_slots // top_k, top_k, hidden)
    acc = torch.zeros_like(parts[0, :, 0])
    for s in range(split_k):
        for j in range(top_k):
            acc += parts[s, :, j]
    return acc.to(dtype)
