"""The expert quantization scheme (mixexport.quant): layout, round trip, refusals."""

import pytest
import torch

from mixexport.errors import MixexportError
from mixexport.quant import QuantScheme, dequantize, parse_scheme, quantize, unpack


@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_error_is_within_half_a_step(scheme, dtype):
    torch.manual_seed(0)
    w = torch.randn(3, 40, 128).to(dtype)
    stored, scale = quantize(w, scheme, dtype)
    assert stored.dtype == torch.uint8 and scale.dtype == dtype
    assert stored.shape == (3, 40, 128 if scheme.bits == 8 else 64)
    assert scale.shape == (3, 40, 1 if scheme.bits == 8 else 128 // scheme.group_size)
    back = dequantize(stored, scale, scheme)
    step = scale.to(torch.float32).repeat_interleave(scheme.group(128), dim=-1)
    # half a step of rounding, plus the scale's own rounding to the model dtype at the row maximum
    assert ((back - w.float()).abs() <= step * 0.5 + w.float().abs() * 2.0**-7 + 1e-6).all()
    q = unpack(stored, scheme)
    assert int(q.abs().max()) <= scheme.qmax


def test_int4_packing_is_low_nibble_first():
    scheme = QuantScheme(4, 32)
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 7.0, -7.0  # q = 7 and -7 at scale 1: stored 15 and 1
    stored, scale = quantize(w, scheme, torch.float32)
    assert float(scale[0, 0]) == 1.0
    assert int(stored[0, 0]) == 15 | (1 << 4)
    assert int(stored[0, 1]) == 8 | (8 << 4)


def test_zero_group_dequantizes_to_zero():
    stored, scale = quantize(torch.zeros(2, 64), QuantScheme(8), torch.float16)
    assert float(scale.abs().max()) == 0.0
    assert float(dequantize(stored, scale, QuantScheme(8)).abs().max()) == 0.0


def test_dequantize_is_exact_for_stored_bytes():
    # the reference must equal q * scale computed from the stored model-dtype scale, bit for bit
    scheme = QuantScheme(4, 32)
    w = torch.randn(4, 64, dtype=torch.float16)
    stored, scale = quantize(w, scheme, torch.float16)
    q = unpack(stored, scheme).float()
    assert torch.equal(dequantize(stored, scale, scheme), q * scale.float().repeat_interleave(32, dim=-1))


@pytest.mark.parametrize("args,message", [
    (("int2", None), "must be int8, int4 or none"),
    (("int8", 32), "int8 is per output channel"),
    (("int4", 48), "group size must be one of"),
    ((None, 32), "applies to --experts-quant int4"),
])
def test_parse_scheme_refuses(args, message):
    with pytest.raises(MixexportError, match=message):
        parse_scheme(*args)


def test_refusal_names_the_size():
    assert QuantScheme(4, 64).refusal(64, 96) == (
        "int4-g64 needs intermediate_size (96) to be a multiple of the group size 64")
    assert QuantScheme(4, 32).refusal(4096, 14336) is None
    assert parse_scheme("int4").name == "int4-g32" and parse_scheme("int8").name == "int8"
