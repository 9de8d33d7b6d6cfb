"""The whole Triton pipeline and its GEMM stages against the MoE op reference, computed in float64."""

import pytest
import torch
import triton
import triton.language as tl

from mixexport.errors import MixexportError
from mixexport.kernels import fused_moe
from mixexport.kernels.align import launch_align
from mixexport.kernels.configs import INTERPRETER_TILES
from mixexport.kernels.grouped_gemm import (down_reference, gate_up_reference, grouped_order, launch_down,
                                            launch_gate_up)
from mixexport.kernels.reduce import launch_topk_reduce, topk_reduce_reference
from mixexport.kernels.routing import launch_routing
from mixexport.model.moe import moe_reference

# H and I are multiples of none of the tiles (16, 32, 64, 128), so every masked edge is exercised.
HIDDEN_INTER = [(44, 52), (33, 19)]
# Every N x E x K of the issue, H and I alternating between the two irregular pairs.
SHAPES = [(n, *HIDDEN_INTER[(a + b) % 2], e, k)
          for a, n in enumerate([1, 7, 64]) for b, (e, k) in enumerate(
              [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (16, 1), (16, 2), (16, 4)])]
HALF_SHAPES = [(1, 44, 52, 4, 1), (7, 44, 52, 8, 2), (64, 33, 19, 16, 4), (64, 44, 52, 8, 2)]
SHAPE_ID = "N{}-H{}-I{}-E{}-K{}".format


def _max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).abs().max().item()


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return _max_abs_error(out, ref) / ref.abs().max().item()


def _reference(x, logits, w_gate_up, w_down, top_k, normalize=True):
    return moe_reference(x.double(), logits.double(), w_gate_up.double(), w_down.double(), top_k, normalize)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: SHAPE_ID(*s))
def test_fp32(moe_inputs, shape):
    n, h, i, e, k = shape
    x, logits, w_gate_up, w_down = moe_inputs(n, h, i, e, torch.float32)
    out = fused_moe(x, logits, w_gate_up, w_down, k)
    assert out.dtype == torch.float32 and out.shape == (n, h)
    assert _max_abs_error(out, _reference(x, logits, w_gate_up, w_down, k)) <= 1e-5


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=lambda s: SHAPE_ID(*s))
def test_half(moe_inputs, shape, dtype, tolerance):
    # The 16-bit paths round the SwiGLU activation and the output to the dtype (2**-11 for fp16,
    # 2**-8 for bf16), so the bounds are a few of those roundings relative to the output scale.
    n, h, i, e, k = shape
    x, logits, w_gate_up, w_down = moe_inputs(n, h, i, e, dtype)
    out = fused_moe(x, logits.to(dtype), w_gate_up, w_down, k)
    assert out.dtype == dtype
    assert _relative_error(out, _reference(x, logits.to(dtype), w_gate_up, w_down, k)) <= tolerance


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert(moe_inputs, top_k):
    # Expert 5 (and, for k=2, expert 2) takes every token; the other experts have zero tokens.
    x, logits, w_gate_up, w_down = moe_inputs(64, 44, 52, 8, torch.float32)
    logits[:, 5] += 30.0
    logits[:, 2] += 20.0
    out = fused_moe(x, logits, w_gate_up, w_down, top_k)
    assert _max_abs_error(out, _reference(x, logits, w_gate_up, w_down, top_k)) <= 1e-5


def test_most_experts_empty_and_unnormalized(moe_inputs):
    x, logits, w_gate_up, w_down = moe_inputs(7, 33, 19, 16, torch.float32)
    out = fused_moe(x, logits, w_gate_up, w_down, 2, normalize=False)
    assert _max_abs_error(out, _reference(x, logits, w_gate_up, w_down, 2, normalize=False)) <= 1e-5


def test_exact_router_ties(moe_inputs):
    x, logits, w_gate_up, w_down = moe_inputs(7, 44, 52, 8, torch.float32)
    logits = torch.randint(0, 2, logits.shape, generator=torch.Generator().manual_seed(3)).float()
    out = fused_moe(x, logits, w_gate_up, w_down, 2)
    assert _max_abs_error(out, _reference(x, logits, w_gate_up, w_down, 2)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_router_logits(moe_inputs, dtype):
    # A token without a softmax (NaN, +inf, all -inf) comes out NaN in every column, as the
    # reference says; every other token is as without it (to the last bits), and no id leaves [0, E).
    x, logits, w_gate_up, w_down = moe_inputs(40, 44, 52, 8, dtype)
    logits = logits.to(dtype)
    clean = fused_moe(x, logits, w_gate_up, w_down, 2)
    logits[3, 1] = float("nan")
    logits[20, 7] = float("inf")
    logits[33] = float("-inf")
    logits[35, 0] = float("-inf")  # probability 0 only
    out = fused_moe(x, logits, w_gate_up, w_down, 2)
    ref = _reference(x, logits, w_gate_up, w_down, 2)
    bad = [3, 20, 33]
    assert out[bad].isnan().all() and ref[bad].isnan().all()
    good = [n for n in range(40) if n not in bad]
    assert out[good].isfinite().all()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert _relative_error(out[good], ref[good]) <= tolerance
    changed = [n for n in good if n != 35]
    # The same values up to the accumulation's last bits: a token whose neighbours' routing changed
    # can land at another row of its tile, and the interpreter's BLAS matmul may round a row by its
    # position (1-2 ulp on an AMD EPYC host; bit-equal on the Xeon). A wrong expert or weight is off
    # by orders of magnitude more.
    ulps = 4 * torch.finfo(dtype).eps * clean[changed].abs().max()
    assert (out[changed] - clean[changed]).abs().max() <= ulps
    _, ids = launch_routing(logits, 2, True)
    assert ((ids >= 0) & (ids < 8)).all()


def test_alignment_never_writes_for_an_out_of_range_id():
    # Defence in depth: routing writes ids in [0, E) only; a slot with any other id has no row to go
    # to and must not land on another slot's row (slot 1 would overwrite row 0, slot 4 too).
    topk_ids = torch.tensor([[0, 9], [1, 0], [-1, 1]], dtype=torch.int32)
    block, sentinel = INTERPRETER_TILES["small_m"].block_m, topk_ids.numel()
    sorted_ids, expert_ids = launch_align(topk_ids, 8, block)
    assert sorted_ids[:block].tolist() == [0, 3] + [sentinel] * (block - 2)
    assert sorted_ids[block:2 * block].tolist() == [2, 5] + [sentinel] * (block - 2)
    assert expert_ids[:2].tolist() == [0, 1] and (expert_ids[2:] == -1).all()


def test_deterministic(moe_inputs):
    args = moe_inputs(64, 44, 52, 8, torch.float16)
    assert torch.equal(fused_moe(*args, 2), fused_moe(*args, 2))


def test_no_tokens(moe_inputs):
    x, logits, w_gate_up, w_down = moe_inputs(0, 44, 52, 8, torch.float32)
    assert fused_moe(x, logits, w_gate_up, w_down, 2).shape == (0, 44)


@pytest.mark.parametrize("tile_name", ["small_m", "large_m"])
@pytest.mark.parametrize("inter", [52, 19])  # 19: the second split of I is empty (cdiv(19, 32) = 1 step)
def test_stages_match_their_references(moe_inputs, tile_name, inter):
    n, h, e, k = 7, 44, 8, 2
    tile = INTERPRETER_TILES[tile_name]
    x, logits, w_gate_up, w_down = moe_inputs(n, h, inter, e, torch.float32)
    weights, ids = launch_routing(logits, k, True)
    sorted_ids, expert_ids = launch_align(ids, e, tile.block_m)
    act = launch_gate_up(x, w_gate_up, sorted_ids, expert_ids, k, tile, False)
    # act rows are in sorted order: bring the real rows back to slot order. Rows past the last
    # block (expert -1) are never written, so only the blocks' rows are looked at.
    in_blocks = (expert_ids >= 0).repeat_interleave(tile.block_m)
    real = in_blocks & (sorted_ids < n * k)
    act_slots = torch.empty(n * k, inter)
    act_slots[sorted_ids[real].long()] = act[real]
    ref_act = gate_up_reference(x.double(), w_gate_up.double(), ids)
    torch.testing.assert_close(act_slots.double(), ref_act, rtol=0, atol=1e-5)
    y = launch_down(act, w_down, sorted_ids, expert_ids, weights, tile, False)
    assert y.shape == (tile.split_k, n * k, h)
    torch.testing.assert_close(y.sum(dim=0).double(), down_reference(act_slots.double(), w_down.double(), ids, weights),
                               rtol=0, atol=1e-5)
    out = launch_topk_reduce(y, k, torch.float16)
    torch.testing.assert_close(out, topk_reduce_reference(y, k, torch.float16), rtol=0, atol=0)


@triton.jit
def _order_kernel(out_ptr, num_m, num_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_order(pid, num_m, num_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("num_m,num_n", [(1, 1), (3, 5), (8, 2), (13, 7), (17, 1)])
def test_grouped_order_visits_every_tile_once(num_m, num_n):
    out = torch.empty(num_m * num_n, 2, dtype=torch.int32)
    _order_kernel[(num_m * num_n,)](out, num_m, num_n, GROUP_M=4)
    order = [tuple(t) for t in out.tolist()]
    assert sorted(order) == [(m, c) for m in range(num_m) for c in range(num_n)]
    # Within a group of 4 row blocks, consecutive programs share the column block (the weight tile).
    full = min(num_m, 4)
    assert [c for _, c in order[:full * num_n]] == [c for c in range(num_n) for _ in range(full)]


def test_custom_op(moe_inputs):
    x, logits, w_gate_up, w_down = moe_inputs(7, 44, 52, 8, torch.float32)
    out = torch.ops.mixexport.fused_moe_triton(x, logits, w_gate_up, w_down, 2, True)
    assert _max_abs_error(out, _reference(x, logits, w_gate_up, w_down, 2)) <= 1e-5
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.mixexport.fused_moe_triton(*(mode.from_tensor(t) for t in (x, logits, w_gate_up, w_down)),
                                                    2, True)
    assert fake.shape == x.shape and fake.dtype == x.dtype


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "w_down": a["w_down"][:, :, :-1]}, "w_down has shape"),
    (lambda a: {**a, "router_logits": a["router_logits"][:, :-1]}, "router_logits has shape"),
    (lambda a: {**a, "w_down": a["w_down"].half()}, "w_down is torch.float16 but x is torch.float32"),
    (lambda a: {**a, "top_k": 9}, "top_k=9 must be between 1 and the 8 experts"),
    (lambda a: {**a, "x": a["x"].double(), "w_gate_up": a["w_gate_up"].double(), "w_down": a["w_down"].double()},
     "float32, float16 or bfloat16"),
])
def test_bad_inputs_are_user_errors(moe_inputs, change, message):
    x, logits, w_gate_up, w_down = moe_inputs(7, 44, 52, 8, torch.float32)
    args = change({"x": x, "router_logits": logits, "w_gate_up": w_gate_up, "w_down": w_down, "top_k": 2})
    with pytest.raises(MixexportError, match=message):
        fused_moe(**args)
