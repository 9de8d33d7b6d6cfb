"""The W8A16 and W4A16 grouped GEMMs (dequantization in the weight-load path) against the MoE op
reference run with `mixexport.quant.dequantize`'s weights, computed in float64.

The kernel rounds q * scale (exact in fp32) to the activation dtype before the dot, so the reference
takes the dequantized weights rounded to that dtype: what is left is the 16-bit rounding of the
SwiGLU activation and of the output, the same bounds as the unquantized half-precision tests.
"""

import pytest
import torch

from mixexport.errors import MixexportError
from mixexport.kernels import fused_moe
from mixexport.kernels.align import launch_align
from mixexport.kernels.configs import GemmTile
from mixexport.kernels.grouped_gemm import down_reference, gate_up_reference, launch_down, launch_gate_up
from mixexport.kernels.routing import launch_routing
from mixexport.model.moe import moe_reference
from mixexport.quant import QuantScheme, dequantize, quantize, unpack

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
INT8 = QuantScheme(8)

# (scheme, N, H, I, E, K, dtype). N is never a multiple of the 16/32-row blocks; int8 takes H and I
# that no tile divides; int4's H and I are multiples of its group (the scheme's rule), with groups
# equal to (32) and larger than (64, 128) the interpreter tiles' BLOCK_K of 32. N=70, E=4, K=2 is
# past the small_m rule (140 > 32*4 slots): the large_m tile, unsplit down GEMM.
CASES = [
    (INT8, 7, 44, 52, 4, 1, torch.float16),
    (INT8, 33, 44, 52, 8, 2, torch.bfloat16),
    (INT8, 70, 44, 52, 4, 2, torch.float16),
    (INT8, 5, 44, 52, 8, 2, torch.float32),
    (QuantScheme(4, 32), 7, 96, 64, 8, 2, torch.float16),
    (QuantScheme(4, 32), 33, 64, 96, 4, 1, torch.bfloat16),
    (QuantScheme(4, 64), 5, 128, 64, 8, 2, torch.float16),
    (QuantScheme(4, 64), 70, 64, 128, 4, 2, torch.bfloat16),
    (QuantScheme(4, 128), 3, 128, 128, 4, 2, torch.bfloat16),
    (QuantScheme(4, 128), 9, 128, 128, 8, 1, torch.float16),
]


def _case_id(case):
    scheme, n, h, i, e, k, dtype = case
    return f"{scheme.name}-N{n}-H{h}-I{i}-E{e}-K{k}-{str(dtype).split('.')[-1]}"


def _quantized(moe_inputs, scheme, n, h, i, e, dtype):
    """Inputs in dtype, the experts quantized with scheme, and their dequantized weights in dtype."""
    x, logits, w_gate_up, w_down = moe_inputs(n, h, i, e, torch.float32)
    q_gate_up, s_gate_up = quantize(w_gate_up, scheme, dtype)
    q_down, s_down = quantize(w_down, scheme, dtype)
    # negative scales and q = qmin (stored 0) are in what the kernels decode
    assert all((s < 0).any() and (unpack(q, scheme) == scheme.qmin).any()
               for q, s in ((q_gate_up, s_gate_up), (q_down, s_down)))
    dequantized = (dequantize(q_gate_up, s_gate_up, scheme).to(dtype), dequantize(q_down, s_down, scheme).to(dtype))
    return x.to(dtype), logits.to(dtype), (q_gate_up, q_down), (s_gate_up, s_down), dequantized


def _relative_error(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_quantized_pipeline_matches_the_dequantized_reference(moe_inputs, case):
    scheme, n, h, i, e, k, dtype = case
    x, logits, (q_gate_up, q_down), scales, (w_gate_up, w_down) = _quantized(moe_inputs, scheme, n, h, i, e, dtype)
    out = fused_moe(x, logits, q_gate_up, q_down, k, scheme=scheme, scales=scales)
    assert out.dtype == dtype and out.shape == (n, h)
    ref = moe_reference(x.double(), logits.double(), w_gate_up.double(), w_down.double(), k)
    assert _relative_error(out, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("scheme", [INT8, QuantScheme(4, 32)], ids=lambda s: s.name)
def test_experts_with_zero_tokens(moe_inputs, scheme):
    # Expert 5 and expert 2 take every token; the other six experts get none.
    x, logits, (q_gate_up, q_down), scales, (w_gate_up, w_down) = _quantized(moe_inputs, scheme, 20, 64, 96, 8,
                                                                             torch.float16)
    logits[:, 5] += 30.0
    logits[:, 2] += 20.0
    out = fused_moe(x, logits, q_gate_up, q_down, 2, scheme=scheme, scales=scales)
    ref = moe_reference(x.double(), logits.double(), w_gate_up.double(), w_down.double(), 2)
    assert _relative_error(out, ref) <= TOLERANCE[torch.float16]


def test_quantization_changes_the_result(moe_inputs):
    # The check above is against the dequantized weights, not the originals: int4-g128 weights give
    # a visibly different output from the full-precision ones (so the tests above could fail).
    scheme = QuantScheme(4, 128)
    x, logits, w_gate_up, w_down = moe_inputs(3, 128, 128, 4, torch.float32)
    q_gate_up, s_gate_up = quantize(w_gate_up, scheme, torch.float32)
    q_down, s_down = quantize(w_down, scheme, torch.float32)
    out = fused_moe(x, logits, q_gate_up, q_down, 2, scheme=scheme, scales=(s_gate_up, s_down))
    full = moe_reference(x.double(), logits.double(), w_gate_up.double(), w_down.double(), 2)
    assert _relative_error(out, full) > 1e-2


# Tiles the pipeline's interpreter table does not have: a K block of 64 over groups of 32 (two groups
# per K step) and 64-wide output columns, which H=96 and I=96 leave half-masked.
@pytest.mark.parametrize("tile", [GemmTile(16, 64, 64, 4, 1, split_k=2), GemmTile(32, 64, 64, 4, 1)],
                         ids=["split2", "unsplit"])
@pytest.mark.parametrize("scheme", [INT8, QuantScheme(4, 32)], ids=lambda s: s.name)
def test_stages_with_groups_smaller_than_the_k_block(moe_inputs, tile, scheme):
    n, h, i, e, k = 7, 96, 96, 4, 2
    x, logits, (q_gate_up, q_down), (s_gate_up, s_down), (w_gate_up, w_down) = _quantized(
        moe_inputs, scheme, n, h, i, e, torch.float32)
    weights, ids = launch_routing(logits, k, True)
    sorted_ids, expert_ids = launch_align(ids, e, tile.block_m)
    act = launch_gate_up(x, q_gate_up, sorted_ids, expert_ids, k, tile, False, s_gate_up, scheme)
    real = (expert_ids >= 0).repeat_interleave(tile.block_m) & (sorted_ids < n * k)
    act_slots = torch.empty(n * k, i)
    act_slots[sorted_ids[real].long()] = act[real]
    torch.testing.assert_close(act_slots.double(), gate_up_reference(x.double(), w_gate_up.double(), ids),
                               rtol=0, atol=1e-5)
    y = launch_down(act, q_down, sorted_ids, expert_ids, weights, tile, False, s_down, scheme)
    torch.testing.assert_close(y.sum(dim=0).double(),
                               down_reference(act_slots.double(), w_down.double(), ids, weights), rtol=0, atol=1e-5)


def _args(moe_inputs, scheme=QuantScheme(4, 32)):
    x, logits, (q_gate_up, q_down), scales, _ = _quantized(moe_inputs, scheme, 3, 64, 64, 4, torch.float16)
    return {"x": x, "router_logits": logits, "w_gate_up": q_gate_up, "w_down": q_down, "top_k": 2,
            "scheme": scheme, "scales": scales}


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "scales": None}, "int4-g32 weights need their scales"),
    (lambda a: {**a, "scheme": None}, "scales were given without the quantization scheme"),
    (lambda a: {**a, "w_down": a["w_down"][:, :, :-1]}, r"w_down has shape \(4, 64, 31\), expected \(4, 64, 32\)"),
    (lambda a: {**a, "scales": (a["scales"][0][:, :, :1], a["scales"][1])},
     r"s_gate_up has shape \(4, 128, 1\), expected \(4, 128, 2\)"),
    (lambda a: {**a, "scales": (a["scales"][0], a["scales"][1].float())}, "s_down is torch.float32; scales are in x"),
    (lambda a: {**a, "w_gate_up": a["w_gate_up"].to(torch.int8)}, "w_gate_up is torch.int8; int4-g32 weights are "
                                                                   "stored as torch.uint8"),
    (lambda a: {**a, "scheme": QuantScheme(4, 128)}, "hidden_size .64. to be a multiple of the group size 128"),
])
def test_bad_quantized_inputs_are_user_errors(moe_inputs, change, message):
    with pytest.raises(MixexportError, match=message):
        fused_moe(**change(_args(moe_inputs)))
