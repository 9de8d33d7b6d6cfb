"""The two grouped GEMMs over the expert-sorted token layout of `align.py`.

    gate_up: act[r]  = silu(Gate[e] @ x[n]) * (Up[e] @ x[n])       for row r holding slot n*K+j, e = its expert
    down:    y[s, n*K+j] = w[n, j] * (Down[e][:, I_s] @ act[r, I_s])  fp32 per split s of I, summed over s
                                                                      and j by `reduce.py`

One program computes a BLOCK_M x BLOCK_N output tile of one expert: every row of a block belongs to the
same expert (the alignment padded each expert to BLOCK_M rows), so the weight tile it streams is
shared by all rows, and each weight byte is read once per block of tokens. That weight stream is the
whole cost at decode sizes. Grids are static upper bounds; a block past the routed work finds
expert -1 and exits before loading anything.

Program order: GROUP_M blocks of rows run one after another on the same weight columns
(`grouped_order`), so a weight tile read from DRAM by the first serves the next ones from L2 while
the expert's blocks last. With the plain row-major order the programs sharing a weight tile run
cdiv(I, BLOCK_N) launches apart, long after it left L2, and prefill re-streams the weights once per
block of rows.

Weight-only quantized experts (`mixexport.quant`: QUANT_BITS 8 or 4, uint8 storage with the offset
2**(bits-1), int4 two per byte along K, low nibble first; scales [E, rows, K/G] in the activation
dtype) take the same kernels with the dequantization in the weight-load path (`load_weights`):
bytes -> signed q -> q * the group's scale in fp32 -> the activation dtype -> the same fp32-accumulating
dot. q * scale is exact in fp32 for 16-bit scales (at most 7 + 11 significant bits), so the tile the
dot sees is bit for bit `mixexport.quant.dequantize(...)` rounded to the activation dtype: the
dequantized reference is what the kernel computes, not an approximation of it. The weight stream, the
whole cost at decode sizes, shrinks to 1/2 (int8) or 1/4 (int4) of the fp16 bytes plus the scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixexport.kernels.configs import GRIDS, GemmTile, evaluate, quant_constexprs
from mixexport.quant import QuantScheme


@triton.jit
def grouped_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` over a num_m x num_n tile grid, GROUP_M row blocks
    at a time down each column block."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % group_m, in_group // group_m


@triton.jit
def load_weights(w_ptr, w_rows, s_ptr, s_rows, k0, k, mask, col_ok, num_groups, QUANT_BITS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile of the K step starting at k0, in `dtype`: element (k, n) of row n.

    w_rows [1, BLOCK_N] are the offsets of each row's first weight (element, or byte when quantized)
    from w_ptr; s_rows those of its first scale from s_ptr (None, and never touched, when QUANT_BITS
    is 0), which has num_groups scales per row; k = k0 + arange(BLOCK_K) as [BLOCK_K, 1]; mask
    [BLOCK_K, BLOCK_N] and col_ok [1, BLOCK_N] say which elements and rows exist. GROUP_SIZE 0 is one
    scale per row; otherwise it and BLOCK_K divide one another (`kernel_shape_refusal`), so a step
    reads whole groups' scales: [1, BLOCK_N] of them, or [BLOCK_K / GROUP_SIZE, BLOCK_N] broadcast
    down their groups. Loading a scale per element instead would stage a second full tile per
    pipeline stage in shared memory (too much for sm_90 at the small_m tile).
    """
    # One return at the end: the compiler visits the code after a return in a constexpr branch too.
    if QUANT_BITS == 0:
        tile = tl.load(w_ptr + w_rows + k, mask=mask, other=0.0)
    else:
        per_byte: tl.constexpr = 8 // QUANT_BITS
        # int4: both nibbles of a byte come from the same address, so the second read hits L1 (DRAM
        # traffic stays one read per byte). A masked element decodes to -2**(bits-1) * its scale, a
        # finite value that meets a zero of x (past K) or lands in an output column never stored.
        stored = tl.load(w_ptr + w_rows + k // per_byte, mask=mask, other=0).to(tl.int32)
        q = ((stored >> ((k % per_byte) * QUANT_BITS)) & ((1 << QUANT_BITS) - 1)) - (1 << (QUANT_BITS - 1))
        if GROUP_SIZE == 0:
            scale = tl.load(s_ptr + s_rows, mask=col_ok, other=0.0)
        elif GROUP_SIZE >= BLOCK_K:
            scale = tl.load(s_ptr + s_rows + k0 // GROUP_SIZE, mask=col_ok, other=0.0)
        else:
            per_step: tl.constexpr = BLOCK_K // GROUP_SIZE
            groups = (k0 // GROUP_SIZE + tl.arange(0, per_step))[:, None]
            scales = tl.load(s_ptr + s_rows + groups, mask=(groups < num_groups) & col_ok, other=0.0)
            scale = tl.reshape(tl.broadcast_to(scales[:, None, :], (per_step, GROUP_SIZE, scales.shape[1])),
                               (BLOCK_K, scales.shape[1]))
        tile = (q.to(tl.float32) * scale.to(tl.float32)).to(dtype)
    return tile


@triton.jit
def gate_up_kernel(
    x_ptr,  # [N, H] contiguous
    w_ptr,  # [E, 2I, H] contiguous: gate rows 0..I-1, up rows I..2I-1 (uint8 [E, 2I, H*QUANT_BITS/8] when quantized)
    sorted_ids_ptr,  # [MAX_BLOCKS*BLOCK_M] int32 slots, N*K = padding
    expert_ids_ptr,  # [MAX_BLOCKS] int32, -1 = no work
    act_ptr,  # [MAX_BLOCKS*BLOCK_M, I] out, x's dtype
    num_slots,  # N*K
    H,
    I,
    K,
    s_ptr,  # [E, 2I, H/G] scales in x's dtype when quantized; a constexpr None otherwise
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,  # multiply in fp32 (the interpreter's bf16 dot is wrong)
    QUANT_BITS: tl.constexpr = 0,  # 0: weights in x's dtype; 8 or 4: uint8-stored, dequantized on load
    GROUP_SIZE: tl.constexpr = 0,  # columns per scale; 0: one per row
):
    num_n = tl.cdiv(I, BLOCK_N)
    # The grid is MAX_BLOCKS x num_n programs.
    pid_m, pid_n = grouped_order(tl.program_id(0), tl.num_programs(0) // num_n, num_n, GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + rows)
    row_ok = slots < num_slots
    tokens = (slots // K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    # Weight row strides: elements, or bytes (H*QUANT_BITS/8) and scale groups when quantized.
    if QUANT_BITS == 0:
        w_row = H
    else:
        w_row = H // (8 // QUANT_BITS)
    if GROUP_SIZE == 0:
        s_row = 1
    else:
        s_row = H // GROUP_SIZE
    # int64 offsets: E*2I*H passes 2**31 elements for large models.
    x_rows = x_ptr + tokens[:, None] * H
    gate_rows = (expert * 2 * I + cols.to(tl.int64))[None, :]
    up_rows = gate_rows + I
    # Gate and up tiles share the x tile: one A load feeds two MMAs, and the SwiGLU needs both
    # results of the same column, so they are computed side by side instead of as one 2I-wide GEMM.
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_gate = load_weights(w_ptr, gate_rows * w_row, s_ptr, gate_rows * s_row, k0, k[:, None], b_mask,
                              col_ok[None, :], s_row, QUANT_BITS, GROUP_SIZE, BLOCK_K, x_ptr.dtype.element_ty)
        b_up = load_weights(w_ptr, up_rows * w_row, s_ptr, up_rows * s_row, k0, k[:, None], b_mask,
                            col_ok[None, :], s_row, QUANT_BITS, GROUP_SIZE, BLOCK_K, x_ptr.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
            b_gate = b_gate.to(tl.float32)
            b_up = b_up.to(tl.float32)
        # "ieee" keeps fp32 inputs off TF32; 16-bit inputs take the tensor cores either way.
        acc_gate = tl.dot(a, b_gate, acc_gate, input_precision="ieee")
        acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")

    # SwiGLU in fp32 in the epilogue: the [rows, 2I] pre-activation never reaches memory.
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(act_ptr + rows[:, None] * I + cols[None, :], act.to(act_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(
    act_ptr,  # [MAX_BLOCKS*BLOCK_M, I] from gate_up_kernel
    w_ptr,  # [E, H, I] contiguous (uint8 [E, H, I*QUANT_BITS/8] when quantized)
    sorted_ids_ptr,  # [MAX_BLOCKS*BLOCK_M] int32
    expert_ids_ptr,  # [MAX_BLOCKS] int32
    topk_weights_ptr,  # [N*K] fp32
    y_ptr,  # [SPLIT_K, N*K, H] fp32 out
    num_slots,  # N*K
    H,
    I,
    s_ptr,  # [E, H, I/G] scales in act's dtype when quantized; a constexpr None otherwise
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,
    QUANT_BITS: tl.constexpr = 0,  # as in gate_up_kernel
    GROUP_SIZE: tl.constexpr = 0,
):
    # The grid is SPLIT_K x MAX_BLOCKS x num_n programs, the split slowest: the programs of one
    # split share weight columns in the grouped order, as in gate_up.
    num_n = tl.cdiv(H, BLOCK_N)
    per_split = tl.num_programs(0) // SPLIT_K
    split = tl.program_id(0) // per_split
    pid_m, pid_n = grouped_order(tl.program_id(0) % per_split, per_split // num_n, num_n, GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + rows)
    row_ok = slots < num_slots
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    # This split's share of I, whole BLOCK_K steps (the last split may be short or empty: it then
    # writes zeros, which the reduction adds like any other split).
    k_per_split = tl.cdiv(tl.cdiv(I, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(I, k_start + k_per_split)
    ks = tl.arange(0, BLOCK_K)
    if QUANT_BITS == 0:
        w_row = I
    else:
        w_row = I // (8 // QUANT_BITS)
    if GROUP_SIZE == 0:
        s_row = 1
    else:
        s_row = I // GROUP_SIZE
    # The A rows are contiguous (act is already in sorted order): no gather on this side.
    a_rows = act_ptr + rows[:, None] * I
    b_rows = (expert * H + cols.to(tl.int64))[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_end
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = load_weights(w_ptr, b_rows * w_row, s_ptr, b_rows * s_row, k0, k[:, None], k_ok[:, None] & col_ok[None, :],
                         col_ok[None, :], s_row, QUANT_BITS, GROUP_SIZE, BLOCK_K, act_ptr.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")

    # The routing weight scales the fp32 accumulator before any rounding; rows go back to slot order
    # (y[s, n*K + j]), so the reduction over s and j needs no inverse map and no atomics.
    weight = tl.load(topk_weights_ptr + slots, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    y_rows = split.to(tl.int64) * num_slots + slots.to(tl.int64)
    tl.store(y_ptr + y_rows[:, None] * H + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def launch_gate_up(x: torch.Tensor, w_gate_up: torch.Tensor, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                   top_k: int, tile: GemmTile, upcast: bool, s_gate_up: torch.Tensor | None = None,
                   scheme: QuantScheme | None = None) -> torch.Tensor:
    """Run the gate/up grouped GEMM with the SwiGLU epilogue.

    Args:
        x: [N, H] contiguous.
        w_gate_up: [E, 2I, H] contiguous, x's dtype; uint8 [E, 2I, H*bits/8] (`mixexport.quant.quantize`'s
            storage) when `scheme` is given.
        sorted_ids, expert_ids: from `launch_align` with tile.block_m.
        top_k: K.
        tile: GEMM tile sizes.
        upcast: multiply in fp32 (bf16 under the interpreter).
        s_gate_up: [E, 2I, H/G] scales in x's dtype, with `scheme`.
        scheme: the quantization of w_gate_up, None for weights in x's dtype.

    Returns:
        act [MAX_BLOCKS*BLOCK_M, I] in x's dtype; padding rows are left unwritten.
    """
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    inter = two_inter // 2
    act = torch.empty(sorted_ids.numel(), inter, dtype=x.dtype, device=x.device)
    grid = (evaluate(GRIDS["gate_up"], N=num_tokens, H=hidden, I=inter, E=num_experts, K=top_k,
                     BLOCK_M=tile.block_m, BLOCK_N=tile.block_n),)
    gate_up_kernel[grid](x, w_gate_up, sorted_ids, expert_ids, act, num_tokens * top_k, hidden, inter, top_k,
                         s_gate_up, **tile.constexprs("gate_up"), UPCAST=upcast, **_quant(scheme),
                         num_warps=tile.num_warps, num_stages=tile.num_stages)
    return act


def launch_down(act: torch.Tensor, w_down: torch.Tensor, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                topk_weights: torch.Tensor, tile: GemmTile, upcast: bool, s_down: torch.Tensor | None = None,
                scheme: QuantScheme | None = None) -> torch.Tensor:
    """Run the down grouped GEMM, scaled by the routing weights.

    Args:
        act: [MAX_BLOCKS*BLOCK_M, I] from `launch_gate_up`.
        w_down: [E, H, I] contiguous, act's dtype; uint8 [E, H, I*bits/8] when `scheme` is given.
        sorted_ids, expert_ids: from `launch_align` with tile.block_m.
        topk_weights: [N, K] float32.
        tile: GEMM tile sizes.
        upcast: multiply in fp32 (bf16 under the interpreter).
        s_down: [E, H, I/G] scales in act's dtype, with `scheme`.
        scheme: the quantization of w_down, None for weights in act's dtype.

    Returns:
        y [SPLIT_K, N*K, H] float32: summed over its first axis, row n*K+j = w[n, j] * Down[e_j] @ act.
    """
    num_tokens, top_k = topk_weights.shape
    num_experts, hidden, _ = w_down.shape
    inter = act.shape[1]
    y = torch.empty(tile.split_k, num_tokens * top_k, hidden, dtype=torch.float32, device=act.device)
    grid = (evaluate(GRIDS["down"], N=num_tokens, H=hidden, I=inter, E=num_experts, K=top_k,
                     BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SPLIT_K=tile.split_k),)
    down_kernel[grid](act, w_down, sorted_ids, expert_ids, topk_weights, y, num_tokens * top_k, hidden, inter,
                      s_down, **tile.constexprs("down"), UPCAST=upcast, **_quant(scheme), num_warps=tile.num_warps,
                      num_stages=tile.num_stages)
    return y


def _quant(scheme: QuantScheme | None) -> dict[str, int]:
    return quant_constexprs(0, None) if scheme is None else quant_constexprs(scheme.bits, scheme.group_size)


def gate_up_reference(x: torch.Tensor, w_gate_up: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Naive gate/up stage in slot order.

    Args:
        x: [N, H].
        w_gate_up: [E, 2I, H].
        topk_ids: [N, K] expert ids.

    Returns:
        [N*K, I] silu(gate) * up, computed in x's dtype promoted to at least float32.
    """
    inter = w_gate_up.shape[1] // 2
    dtype = torch.promote_types(x.dtype, torch.float32)
    tokens = torch.arange(topk_ids.numel(), device=x.device) // topk_ids.shape[1]
    w = w_gate_up[topk_ids.reshape(-1).long()].to(dtype)  # [N*K, 2I, H]
    gate_up = torch.einsum("sih,sh->si", w, x[tokens].to(dtype))  # [N*K, 2I]
    return torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]


def down_reference(act: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
    """Naive down stage in slot order.

    Args:
        act: [N*K, I].
        w_down: [E, H, I].
        topk_ids: [N, K] expert ids.
        topk_weights: [N, K].

    Returns:
        [N*K, H] weighted expert outputs, in act's dtype promoted to at least float32.
    """
    dtype = torch.promote_types(act.dtype, torch.float32)
    w = w_down[topk_ids.reshape(-1).long()].to(dtype)  # [N*K, H, I]
    return torch.einsum("shi,si->sh", w, act.to(dtype)) * topk_weights.reshape(-1, 1).to(dtype)
