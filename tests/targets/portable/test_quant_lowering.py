"""lower_moe_portable with quantized experts: standard DequantizeLinear (opset 21 blocked, uint8 /
uint4) feeding the expert math, exact against the reference on the dequantized experts."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from mixexport.targets.portable.lowering import LowerMoEToPortable
from passes.single_moe import run
from targets.quant_single_moe import SCHEMES, SHAPES, TOLERANCE, check_non_finite_rows, quant_case


def _all_nodes(graph):
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _all_nodes(attr.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_dequantize_linear_matches_dequantized_reference(name, dtype):
    model, x, logits, expected = quant_case(name, dtype)
    LowerMoEToPortable(SCHEMES[name])(model)
    experts = model.graph.initializers["layers.0.moe.experts.0.w_gate_up.qweight"]
    assert experts.dtype == (ir.DataType.UINT8 if SCHEMES[name].bits == 8 else ir.DataType.UINT4)
    dq = [n for n in _all_nodes(model.graph) if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * SHAPES[name][0]  # gate/up and down of every expert
    assert model.opset_imports[""] >= 21
    y = run(model, x, logits)
    np.testing.assert_allclose(y.astype(np.float32), expected, atol=TOLERANCE[dtype], rtol=0)



@pytest.mark.parametrize("name", ["int8", "int4-g32"])
def test_non_finite_router_rows_follow_the_moe_rule(name):
    check_non_finite_rows(LowerMoEToPortable, name)
