"""Shared by the quantized-lowering tests of every target: one MoE node, lowered with a scheme,
run in onnxruntime against the reference on the dequantized experts."""

from __future__ import annotations

import numpy as np
import torch

from mixexport.quant import QuantScheme, quantize, unpack
from mixexport.validate.quant_parity import dequantized_moe
from passes.single_moe import moe_weights, run, single_moe_model

# (experts, hidden, intermediate): K's that every group size divides, and irregular ones for the
# smaller groups (H 96 = 3 groups of 32, I 160 = 5).
SHAPES = {"int8": (4, 48, 40), "int4-g32": (4, 96, 160), "int4-g64": (3, 128, 64), "int4-g128": (2, 128, 256)}
SCHEMES = {"int8": QuantScheme(8), "int4-g32": QuantScheme(4, 32), "int4-g64": QuantScheme(4, 64),
           "int4-g128": QuantScheme(4, 128)}


def quant_case(name: str, dtype, top_k: int = 2, tokens: int = 9, seed: int = 0):
    """(model, x, logits, expected) for scheme `name` in numpy `dtype`: expected is the MoE of
    the dequantized experts, computed in float32."""
    experts, hidden, inter = SHAPES[name]
    w_gate_up, w_down = moe_weights(experts, hidden, inter, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((tokens, hidden)).astype(dtype)
    logits = rng.standard_normal((tokens, experts)).astype(dtype)
    t = [torch.from_numpy(a) for a in (x, logits, w_gate_up, w_down)]
    assert uses_full_range(t[2], SCHEMES[name]) and uses_full_range(t[3], SCHEMES[name])
    expected = dequantized_moe(t[0].float(), t[1].float(), t[2], t[3], top_k, True, SCHEMES[name]).numpy()
    return single_moe_model(w_gate_up, w_down, top_k=top_k, normalize=True), x, logits, expected


def uses_full_range(weight: torch.Tensor, scheme: QuantScheme) -> bool:
    """Whether `weight` quantizes to some negative scales and some q = qmin (stored 0): the cases
    a consumer of the scheme could get wrong, so every lowering test must run through them."""
    stored, scale = quantize(weight, scheme, weight.dtype)
    return bool((scale < 0).any()) and bool((unpack(stored, scheme) == scheme.qmin).any())


# max |diff| against the dequantized reference: fp32 round-off; fp16 activations and output.
TOLERANCE = {np.float32: 2e-5, np.float16: 4e-3}


def non_finite_case(name: str):
    """quant_case's fp32 model with router rows that have no softmax (rows 1, 3, 4: NaN by the MoE
    rule) and a lone -inf (row 5: an ordinary row); expected from the dequantized reference."""
    model, x, logits, _ = quant_case(name, np.float32)
    logits[1, 2], logits[3, 0], logits[4, :], logits[5, 1] = np.nan, np.inf, -np.inf, -np.inf
    wgu, wd = (model.graph.initializers[f"layers.0.moe.{w}"].const_value.numpy() for w in ("w_gate_up", "w_down"))
    t = [torch.from_numpy(a) for a in (x, logits, wgu, wd)]
    return model, x, logits, dequantized_moe(*t, 2, True, SCHEMES[name]).numpy()


def check_non_finite_rows(lowering, name: str) -> None:
    """`lowering` (a target's MoE lowering class) on `non_finite_case`: the rows with no softmax are
    NaN, every other row matches the dequantized reference."""
    model, x, logits, expected = non_finite_case(name)
    lowering(SCHEMES[name])(model)
    y = run(model, x, logits)
    assert np.isnan(y[[1, 3, 4]]).all() and np.isnan(expected[[1, 3, 4]]).all()
    finite = [0, 2, 5, 6, 7, 8]
    np.testing.assert_allclose(y[finite], expected[finite], atol=TOLERANCE[np.float32], rtol=0)
