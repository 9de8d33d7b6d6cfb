"""lower_moe_trt with quantized experts: the MixtralMoE node the shared issue-15 contract fixes
(attributes quant_bits/group_size, inputs s_gate_up/s_down, uint8 weights), checked for its
structure and for bytes that dequantize to exactly the reference's experts.

The CPU stand-in run of whole quantized trt artifacts is in tests/validate/test_quant_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixexport.quant import dequantize, quantize
from mixexport.targets import BACKENDS
from mixexport.targets.trt.lowering import LowerMoEToTrtPlugin
from passes.single_moe import moe_weights, single_moe_model
from targets.quant_single_moe import SCHEMES

@pytest.mark.parametrize("name", ["int8", "int4-g32", "int4-g128"])
def test_node_follows_shared_contract(name):
    scheme = SCHEMES[name]
    e, h, i = 4, 128, 256
    w_gate_up, w_down = moe_weights(e, h, i, dtype=np.float16)
    model = single_moe_model(w_gate_up, w_down, top_k=2, normalize=True)
    assert LowerMoEToTrtPlugin(scheme)(model).rewrites == 1
    (node,) = list(model.graph)
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs["quant_bits"] == scheme.bits and attrs["group_size"] == (scheme.group_size or 0)
    assert [v.name for v in node.inputs][:2] == ["x", "logits"]
    wgu, wd, sgu, sd = node.inputs[2:]
    g_h, g_i = scheme.group(h), scheme.group(i)
    assert (wgu.dtype.name, tuple(wgu.shape)) == ("UINT8", (e, 2 * i, h * scheme.bits // 8))
    assert (wd.dtype.name, tuple(wd.shape)) == ("UINT8", (e, h, i * scheme.bits // 8))
    assert (sgu.dtype.name, tuple(sgu.shape)) == ("FLOAT16", (e, 2 * i, h // g_h))
    assert (sd.dtype.name, tuple(sd.shape)) == ("FLOAT16", (e, h, i // g_i))
    # gate rows then up rows, the scheme's bytes: they dequantize to the reference's experts
    for stored, scales, w in ((wgu, sgu, w_gate_up), (wd, sd, w_down)):
        expected = dequantize(*quantize(torch.from_numpy(w), scheme, torch.float16), scheme)
        got = dequantize(torch.from_numpy(stored.const_value.numpy()), torch.from_numpy(scales.const_value.numpy()),
                         scheme)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_full_precision_node_keeps_four_inputs():
    w_gate_up, w_down = moe_weights(4, 16, 12)
    model = single_moe_model(w_gate_up, w_down, top_k=2, normalize=True)
    LowerMoEToTrtPlugin()(model)
    (node,) = list(model.graph)
    assert len(node.inputs) == 4
    assert not {"quant_bits", "group_size"} & set(node.attributes)  # absent: the contract's default, 0


def test_the_contract_serves_quantized_experts():
    from mixexport.checkpoint.config import preset

    assert BACKENDS["trt"].quant_refusal(preset("tiny"), SCHEMES["int8"]) is None
    assert BACKENDS["trt"].quant_refusal(preset("mixtral-8x7b"), SCHEMES["int4-g128"]) is None
