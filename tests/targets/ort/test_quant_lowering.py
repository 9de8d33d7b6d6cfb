"""lower_moe_ort with quantized experts: one com.microsoft.QMoE per layer, exact against the
reference on the dequantized experts, for every scheme in fp32 and fp16."""

from __future__ import annotations

import numpy as np
import pytest

from mixexport.targets.ort.lowering import LowerMoEToOrt
from passes.single_moe import run
from targets.quant_single_moe import SCHEMES, TOLERANCE, check_non_finite_rows, quant_case


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_qmoe_matches_dequantized_reference(name, dtype):
    model, x, logits, expected = quant_case(name, dtype)
    result = LowerMoEToOrt(SCHEMES[name])(model)
    assert result.rewrites == 1
    (qmoe,) = [n for n in model.graph if n.op_type == "QMoE"]
    assert qmoe.domain == "com.microsoft" and not [n for n in model.graph if n.op_type == "MoE"]
    attrs = {k: a.value for k, a in qmoe.attributes.items()}
    assert attrs["expert_weight_bits"] == SCHEMES[name].bits and attrs["weights_prepacked"] == 0
    assert attrs.get("block_size") == SCHEMES[name].group_size
    assert qmoe.inputs[2].dtype.name == "UINT8"
    y = run(model, x, logits)
    assert y.dtype == dtype
    np.testing.assert_allclose(y.astype(np.float32), expected, atol=TOLERANCE[dtype], rtol=0)


def test_full_precision_experts_keep_moe_on_cuda_only():
    model, x, logits, _ = quant_case("int8", np.float32)
    LowerMoEToOrt(provider="cuda")(model)
    assert [n.op_type for n in model.graph].count("MoE") == 1
    model, x, logits, _ = quant_case("int8", np.float32)
    LowerMoEToOrt(provider="cpu")(model)
    assert [n.op_type for n in model.graph].count("MoE") == 0


@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_quantized_experts_are_qmoe_on_every_provider(provider):
    """No exact int8/int4 kernel beats QMoE on CPU (lowering.py), so both providers get it."""
    model, x, logits, expected = quant_case("int4-g32", np.float32)
    LowerMoEToOrt(SCHEMES["int4-g32"], provider)(model)
    assert [n.op_type for n in model.graph].count("QMoE") == 1
    np.testing.assert_allclose(run(model, x, logits), expected, atol=TOLERANCE[np.float32], rtol=0)


@pytest.mark.parametrize("name", ["int8", "int4-g32"])
def test_non_finite_router_rows_follow_the_moe_rule(name):
    check_non_finite_rows(LowerMoEToOrt, name)
