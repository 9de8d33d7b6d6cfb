"""The expert quantization scheme (mixexport.quant): layout, round trip, refusals."""

import pytest
import torch

from mixexport import quant
from mixexport.errors import MixexportError
from mixexport.quant import QuantScheme, dequantize, parse_scheme, quantize, unpack


def _symmetric_absmax(w, scheme):
    """The plain symmetric scheme, scale absmax/qmax (in w's dtype) and q in [-qmax, qmax]: the search's floor."""
    g = scheme.group(w.shape[-1])
    x = w.float().reshape(*w.shape[:-1], -1, g)
    s = (x.abs().amax(-1, keepdim=True) / scheme.qmax).to(w.dtype).float()
    q = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1)), 0)
    return (q * s).reshape(w.shape)


SCHEMES = [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64)]
WEIGHTS = {"gaussian": lambda g: torch.randn(3, 40, 128, generator=g),
           "student-t": lambda g: torch.randn(3, 40, 128, generator=g) / (torch.rand(3, 40, 128, generator=g) ** 0.25)}


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", WEIGHTS)
def test_round_trip_rounds_to_the_nearest_level_and_beats_absmax(scheme, dtype, kind):
    w = WEIGHTS[kind](torch.Generator().manual_seed(0)).to(dtype)
    stored, scale = quantize(w, scheme, dtype)
    assert stored.dtype == torch.uint8 and scale.dtype == dtype
    assert stored.shape == (3, 40, 128 if scheme.bits == 8 else 64)
    assert scale.shape == (3, 40, 1 if scheme.bits == 8 else 128 // scheme.group_size)
    back = dequantize(stored, scale, scheme)
    q = unpack(stored, scheme).float()
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    # An element strictly inside the range is within half a step of its level (plus round-off).
    step = scale.to(torch.float32).abs().repeat_interleave(scheme.group(128), dim=-1)
    inside = (q > scheme.qmin) & (q < scheme.qmax)
    assert ((back - w.float()).abs() <= step * 0.5001 + 1e-7)[inside].all()
    # Group by group no worse than absmax/qmax (one of the candidates), and clearly better overall.
    g = scheme.group(128)
    error = ((back - w.float()) ** 2).reshape(3, 40, -1, g).sum(-1)
    floor = ((_symmetric_absmax(w, scheme) - w.float()) ** 2).reshape(3, 40, -1, g).sum(-1)
    assert (error <= floor * (1 + 1e-6)).all()
    assert error.sum() <= floor.sum() * (0.99 if scheme.bits == 8 else 0.8)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_full_range_and_signed_scales_are_used(scheme):
    stored, scale = quantize(torch.randn(3, 40, 128, generator=torch.Generator().manual_seed(1)), scheme, torch.float16)
    q = unpack(stored, scheme)
    assert int(q.min()) == scheme.qmin and int(q.max()) == scheme.qmax
    assert bool((scale < 0).any()) and bool((scale > 0).any())


def test_int4_packing_is_low_nibble_first():
    scheme = QuantScheme(4, 32)
    w = torch.zeros(2, 32)
    w[0, 0], w[0, 1] = -8.0, 7.0  # q = -8 and 7 at scale 1 (exact): stored 0 and 15
    w[1, 0], w[1, 1] = 8.0, -7.0  # the max-magnitude value is positive: scale -1 gives it q = -8
    stored, scale = quantize(w, scheme, torch.float32)
    assert scale[:, 0].tolist() == [1.0, -1.0]
    assert stored[:, 0].tolist() == [0 | (15 << 4)] * 2
    assert stored[:, 1].tolist() == [8 | (8 << 4)] * 2


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_rows_quantize_alone(monkeypatch, scheme):
    # one expert, or one chunk of rows, quantized alone is exactly its slice of the stack
    w = torch.randn(3, 40, 128, dtype=torch.float16)
    whole = quantize(w, scheme, torch.float16)
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 3 * 128)
    chunked = quantize(w, scheme, torch.float16)
    alone = quantize(w[1], scheme, torch.float16)
    for a, b, c in zip(whole, chunked, alone):
        assert torch.equal(a, b) and torch.equal(a[1], c)


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
