"""Alignment kernels: group the routed token slots by expert, each expert padded to the GEMM's BLOCK_M.

A slot is s = n*K + j (token n's j-th expert). The output layout, as in vLLM's moe_align_block_size:
    sorted_ids [MAX_BLOCKS*BLOCK_M]: the slots of expert 0, padded with the sentinel N*K to a multiple
                                     of BLOCK_M, then expert 1's, ... (ascending slot order inside an
                                     expert); entries past the last padded block are never read;
    expert_ids [MAX_BLOCKS]:         the expert of each BLOCK_M rows, -1 past the last block, where
                                     the GEMMs exit.
Two launches and no atomics, so the layout is deterministic: `align_count_kernel` writes one expert
histogram per chunk of BLOCK_S slots; `align_scatter_kernel` gives every chunk its base offset by
scanning those histograms and places its slots. Everything stays on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixexport.kernels.configs import ALIGN_BLOCK_C, ALIGN_BLOCK_S, MAX_BLOCKS, cdiv, evaluate


@triton.jit
def align_count_kernel(
    topk_ids_ptr,  # [N*K] int32
    chunk_counts_ptr,  # [cdiv(N*K, BLOCK_S), BLOCK_E] int32 out
    num_slots,  # N*K
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    experts = tl.load(topk_ids_ptr + slots, mask=slots < num_slots, other=-1)
    one_hot = (experts[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)
    tl.store(chunk_counts_ptr + pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E), tl.sum(one_hot, axis=0))


@triton.jit
def align_scatter_kernel(
    topk_ids_ptr,  # [N*K] int32
    chunk_counts_ptr,  # [cdiv(N*K, BLOCK_S), BLOCK_E] int32, from align_count_kernel
    sorted_ids_ptr,  # [MAX_BLOCKS*BLOCK_M] int32 out
    expert_ids_ptr,  # [MAX_BLOCKS] int32 out
    num_slots,  # N*K, also the padding sentinel
    E,
    block_m,  # the GEMMs' BLOCK_M (runtime: one compiled alignment serves every GEMM tile)
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_E)
    # Every program re-reads all chunk histograms (cdiv(N*K, BLOCK_S) * BLOCK_E ints, a few KB even
    # for long prefills) instead of a separate scan launch: per expert, the total and the count in
    # the chunks before this one.
    num_chunks = tl.cdiv(num_slots, BLOCK_S)
    total = tl.zeros((BLOCK_E,), tl.int32)
    before = tl.zeros((BLOCK_E,), tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        counts = tl.load(chunk_counts_ptr + chunks.to(tl.int64)[:, None] * BLOCK_E + lanes[None, :],
                         mask=(chunks < num_chunks)[:, None], other=0)
        total += tl.sum(counts, axis=0)
        before += tl.sum(tl.where((chunks < pid)[:, None], counts, 0), axis=0)
    padded = tl.cdiv(total, block_m) * block_m
    start = tl.cumsum(padded, axis=0) - padded  # first row of each expert

    # Place this chunk's slots: the rank of a slot among the chunk's slots of the same expert is an
    # inclusive prefix count down the one-hot columns, so the order inside an expert is slot order.
    slots = pid.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    experts = tl.load(topk_ids_ptr + slots, mask=slots < num_slots, other=-1)
    # Routing only writes ids in [0, E); a slot with any other id would have no row of its own, so
    # it writes nothing (rather than over the first row).
    slot_ok = (slots < num_slots) & (experts >= 0) & (experts < E)
    one_hot = (experts[:, None] == lanes[None, :]).to(tl.int32)
    rank = tl.sum(one_hot * (tl.cumsum(one_hot, axis=0) - 1), axis=1)
    base = tl.sum(one_hot * (start + before)[None, :], axis=1)
    tl.store(sorted_ids_ptr + (base + rank).to(tl.int64), slots.to(tl.int32), mask=slot_ok)

    if pid == 0:
        # Sentinel rows: expert e's padding is [start+total, start+padded), under BLOCK_M rows.
        pad_start = start + total
        pad_len = padded - total
        for p0 in range(0, block_m, BLOCK_S):
            offs = p0 + tl.arange(0, BLOCK_S)
            tl.store(sorted_ids_ptr + (pad_start[:, None] + offs[None, :]).to(tl.int64),
                     tl.full((BLOCK_E, BLOCK_S), 0, tl.int32) + num_slots,
                     mask=offs[None, :] < pad_len[:, None])
        # Block b belongs to the expert whose block range holds it: the number of experts whose
        # blocks all end at or before b. Past the last block that count reaches E: write -1.
        block_end = (start + padded) // block_m
        max_blocks = tl.cdiv(num_slots, block_m) + tl.minimum(E, num_slots)  # configs.MAX_BLOCKS
        for b0 in range(0, max_blocks, BLOCK_S):
            blocks = b0 + tl.arange(0, BLOCK_S)
            owner = tl.sum((blocks[:, None] >= block_end[None, :]).to(tl.int32), axis=1)
            owner = tl.where(owner < E, owner, -1)
            tl.store(expert_ids_ptr + blocks, owner, mask=blocks < max_blocks)


def launch_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the two alignment kernels.

    Args:
        topk_ids: [N, K] int32 expert ids, contiguous.
        num_experts: E.
        block_m: the GEMM tile's BLOCK_M.

    Returns:
        (sorted_ids [MAX_BLOCKS*BLOCK_M] int32, expert_ids [MAX_BLOCKS] int32), see the module docstring;
        MAX_BLOCKS = cdiv(N*K, BLOCK_M) + min(E, N*K) (configs.MAX_BLOCKS).
    """
    num_slots = topk_ids.numel()
    device = topk_ids.device
    block_e = triton.next_power_of_2(num_experts)
    max_blocks = evaluate(MAX_BLOCKS, N=num_slots, K=1, E=num_experts, BLOCK_M=block_m)
    num_chunks = cdiv(num_slots, ALIGN_BLOCK_S)
    chunk_counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    align_count_kernel[(num_chunks,)](topk_ids, chunk_counts, num_slots, BLOCK_S=ALIGN_BLOCK_S, BLOCK_E=block_e)
    align_scatter_kernel[(num_chunks,)](topk_ids, chunk_counts, sorted_ids, expert_ids, num_slots, num_experts,
                                        block_m, BLOCK_S=ALIGN_BLOCK_S, BLOCK_E=block_e, BLOCK_C=ALIGN_BLOCK_C)
    return sorted_ids, expert_ids


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment computed naively, expert by expert.

    Args:
        topk_ids: [N, K] integer expert ids.
        num_experts: E.
        block_m: rows per GEMM block.

    Returns:
        (sorted_ids [total padded rows] int32, expert_ids [total blocks] int32): only the rows and
        blocks that are read, without the kernel's unused tail.
    """
    flat = topk_ids.reshape(-1).long().cpu()
    sentinel = flat.numel()
    sorted_ids, expert_ids = [], []
    for e in range(num_experts):
        slots = torch.nonzero(flat == e).flatten().tolist()
        blocks = cdiv(len(slots), block_m)
        sorted_ids += slots + [sentinel] * (blocks * block_m - len(slots))
        expert_ids += [e] * blocks
    return torch.tensor(sorted_ids, dtype=torch.int32), torch.tensor(expert_ids, dtype=torch.int32)
