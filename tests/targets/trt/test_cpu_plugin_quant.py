"""The CPU stand-in runs a hand-built quantized MixtralMoE node (the shared contract: six inputs,
quant_bits / group_size) in onnxruntime, against the MoE reference with the dequantized weights."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mixexport.model.moe import moe_reference
from mixexport.quant import QuantScheme, dequantize, quantize
from mixexport.targets.trt.contract import attribute_defaults, attribute_names, input_names, plugin_contract
from mixexport.targets.trt.cpu_plugin import check_plugin_inputs, register, use_cpu_plugin
from passes.single_moe import moe_weights, tied_logits

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
E, H, I, N = 4, 64, 32, 7


def _quantized_node_model(scheme, dtype, top_k, attrs=None, inputs=None):
    """One MixtralMoE node, its weights quantized with `scheme` (initializers), graph inputs x, router_logits."""
    w_gate_up, w_down = (torch.from_numpy(w) for w in moe_weights(E, H, I, seed=3))
    q_gate_up, s_gate_up = quantize(w_gate_up, scheme, dtype)
    q_down, s_down = quantize(w_down, scheme, dtype)
    contract = plugin_contract()
    fields = {"top_k": top_k, "normalize": 1, "num_experts": E, "hidden_size": H, "intermediate_size": I,
              "quant_bits": scheme.bits, "group_size": scheme.group_size or 0,
              "plugin_namespace": contract["plugin_namespace"], "plugin_version": contract["plugin_version"]}
    node = helper.make_node(contract["op_type"], inputs or input_names(quantized=True), ["y"],
                            domain=contract["domain"], **(fields if attrs is None else attrs(fields)))
    elem = ONNX_TYPES[dtype]
    graph = helper.make_graph(
        [node], "quantized_moe",
        [helper.make_tensor_value_info("x", elem, ["N", H]), helper.make_tensor_value_info("router_logits", elem, ["N", E])],
        [helper.make_tensor_value_info("y", elem, ["N", H])],
        initializer=[numpy_helper.from_array(t.numpy(), name) for name, t in
                     (("w_gate_up", q_gate_up), ("w_down", q_down), ("s_gate_up", s_gate_up), ("s_down", s_down))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(contract["domain"], 1)])
    dequantized = (dequantize(q_gate_up, s_gate_up, scheme), dequantize(q_down, s_down, scheme))
    return model, dequantized, (q_gate_up, q_down, s_gate_up, s_down)


def _run(model, x, logits, elem):
    use_cpu_plugin(model, elem)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.register_custom_ops_library(register())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x, "router_logits": logits})[0]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("scheme,top_k", [(QuantScheme(8), 2), (QuantScheme(4, 32), 1), (QuantScheme(4, 32), 2)],
                         ids=["int8-top2", "int4-g32-top1", "int4-g32-top2"])
def test_quantized_node_through_the_cpu_plugin(scheme, top_k, dtype, tolerance):
    model, (w_gate_up, w_down), _ = _quantized_node_model(scheme, dtype, top_k)
    x = np.random.default_rng(1).standard_normal((N, H)).astype(np.float32)
    logits = tied_logits(N, E)
    np_dtype = np.float32 if dtype == torch.float32 else np.float16
    got = _run(model, x.astype(np_dtype), logits.astype(np_dtype), ONNX_TYPES[dtype])
    x_in, logits_in = (torch.from_numpy(a.astype(np_dtype).astype(np.float64)) for a in (x, logits))
    ref = moe_reference(x_in, logits_in, w_gate_up.double(), w_down.double(), top_k).numpy()
    assert got.dtype == np_dtype
    assert np.abs(got.astype(np.float64) - ref).max() <= tolerance * np.abs(ref).max()
    # The dequantized weights are what counts: the full-precision weights give another answer.
    full = moe_reference(x_in, logits_in, *(torch.from_numpy(w).double() for w in moe_weights(E, H, I, seed=3)),
                         top_k).numpy()
    assert np.abs(full - ref).max() > 2 * tolerance * np.abs(ref).max()


def test_int8_node_may_leave_out_the_group_size():
    # group_size absent = 0 = one scale per row: the copy gets the contract's default.
    model, (w_gate_up, w_down), _ = _quantized_node_model(
        QuantScheme(8), torch.float32, 2, attrs=lambda f: {k: v for k, v in f.items() if k != "group_size"})
    x = np.random.default_rng(2).standard_normal((N, H)).astype(np.float32)
    logits = tied_logits(N, E)
    got = _run(model, x, logits, TensorProto.FLOAT)
    ref = moe_reference(torch.from_numpy(x), torch.from_numpy(logits), w_gate_up, w_down, 2).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert attribute_defaults() == {"quant_bits": 0, "group_size": 0}
    assert attribute_names(quantized=True) == [*attribute_names(), "quant_bits", "group_size"]
    assert input_names(quantized=True) == [*input_names(), "s_gate_up", "s_down"]


def test_quantized_node_without_its_scales_is_refused():
    model, _, _ = _quantized_node_model(QuantScheme(8), torch.float32, 2, inputs=input_names())
    with pytest.raises(Exception, match="input size 4 not in range"):
        _run(model, np.zeros((N, H), np.float32), np.zeros((N, E), np.float32), TensorProto.FLOAT)


def test_configure_checks_of_quantized_inputs():
    scheme = QuantScheme(4, 32)
    _, _, (q_gate_up, q_down, s_gate_up, s_down) = _quantized_node_model(scheme, torch.float32, 2)
    attrs = {"top_k": 2, "normalize": 1, "num_experts": E, "hidden_size": H, "intermediate_size": I,
             "quant_bits": 4, "group_size": 32, "plugin_namespace": "mixexport", "plugin_version": "1"}
    good = {"x": np.zeros((3, H), np.float32), "router_logits": np.zeros((3, E), np.float32),
            "w_gate_up": q_gate_up.numpy(), "w_down": q_down.numpy(), "s_gate_up": s_gate_up.numpy(),
            "s_down": s_down.numpy()}
    check_plugin_inputs(good, attrs)
    with pytest.raises(ValueError, match=r"input w_down has shape \(4, 64, 32\), expected \(4, 64, 16\)"):
        check_plugin_inputs({**good, "w_down": np.zeros((E, H, I), np.float32)}, attrs)
    with pytest.raises(ValueError, match=r"input s_gate_up has shape \(4, 64, 1\), expected \(4, 64, 2\)"):
        check_plugin_inputs({**good, "s_gate_up": np.zeros((E, 2 * I, 1), np.float32)}, attrs)
    with pytest.raises(ValueError, match="needs intermediate_size .32. to be a multiple of the group size 64"):
        check_plugin_inputs(good, {**attrs, "group_size": 64})
    with pytest.raises(ValueError, match="quant_bits=4 group_size=0: .*int4 group size must be one of"):
        check_plugin_inputs(good, {**attrs, "group_size": 0})
    with pytest.raises(ValueError, match="group_size=32 without quantized weights"):
        check_plugin_inputs(good, {**attrs, "quant_bits": 0})
