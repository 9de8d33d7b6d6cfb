"""lower_moe_trt: the MixtralMoE plugin node per the plugin contract, run through the CPU stand-in."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from mixexport.targets.trt.lowering import LowerMoEToTrtPlugin
from mixexport.targets.trt.contract import attribute_names, input_names, plugin_contract
from mixexport.targets.trt.cpu_plugin import CONTRIB_DOMAIN, check_plugin_inputs, register
from passes.single_moe import moe_weights, reference, run, single_moe_model, tied_logits


def test_rewrite_emits_contract_node():
    contract = plugin_contract()
    w_gate_up, w_down = moe_weights(8, 16, 12)
    model = single_moe_model(w_gate_up, w_down, top_k=2, normalize=True, layer=1)
    result = LowerMoEToTrtPlugin()(model)
    assert result.modified and result.rewrites == 1
    (node,) = list(model.graph)
    assert (node.domain, node.op_type) == (contract["domain"], "MixtralMoE")
    assert node.name == "layers.1.moe.trt/MixtralMoE"
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert set(attrs) == set(attribute_names()) | {"plugin_namespace", "plugin_version"}
    assert attrs == {"top_k": 2, "normalize": 1, "num_experts": 8, "hidden_size": 16, "intermediate_size": 12,
                     "plugin_namespace": "mixexport", "plugin_version": "1"}
    assert [v.name for v in node.inputs] == ["x", "logits", "layers.1.moe.w_gate_up", "layers.1.moe.w_down"]
    assert input_names() == ["x", "router_logits", "w_gate_up", "w_down"]
    # weights reach the plugin unchanged: [E, 2I, H] and [E, H, I]
    assert tuple(node.inputs[2].shape) == (8, 24, 16) and tuple(node.inputs[3].shape) == (8, 16, 12)
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), w_gate_up)
    assert model.opset_imports[contract["domain"]] == 1


def _run_with_cpu_plugin(model: ir.Model, x, logits):
    for node in model.graph:
        node.domain = CONTRIB_DOMAIN
    model.opset_imports[CONTRIB_DOMAIN] = 1
    options = ort.SessionOptions()
    options.register_custom_ops_library(register())
    return run(model, x, logits, options)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2)])
def test_numerics_through_cpu_plugin(experts, top_k, normalize):
    w_gate_up, w_down = moe_weights(experts, 16, 12, seed=experts)
    x = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    logits = tied_logits(7, experts)
    model = single_moe_model(w_gate_up, w_down, top_k=top_k, normalize=normalize)
    LowerMoEToTrtPlugin()(model)
    got = _run_with_cpu_plugin(model, x, logits)
    np.testing.assert_allclose(got, reference(x, logits, w_gate_up, w_down, top_k, normalize), atol=1e-5, rtol=1e-4)


def test_plugin_configure_checks_refuse_wrong_layout():
    w_gate_up, w_down = moe_weights(4, 16, 12)
    attrs = {"top_k": 2, "normalize": 1, "num_experts": 4, "hidden_size": 16, "intermediate_size": 12,
             "plugin_namespace": "mixexport", "plugin_version": "1"}
    x, logits = np.zeros((3, 16), np.float32), np.zeros((3, 4), np.float32)
    good = {"x": x, "router_logits": logits, "w_gate_up": w_gate_up, "w_down": w_down}
    check_plugin_inputs(good, attrs)
    with pytest.raises(ValueError, match=r"input w_down has shape \(4, 12, 16\), expected \(4, 16, 12\)"):
        check_plugin_inputs({**good, "w_down": w_down.transpose(0, 2, 1)}, attrs)
    with pytest.raises(ValueError, match="top_k=5 outside 1..4"):
        check_plugin_inputs(good, {**attrs, "top_k": 5})
    with pytest.raises(ValueError, match="is not the contract's"):
        check_plugin_inputs(good, {**attrs, "plugin_version": "2"})
