"""A CPU stand-in for the MixtralMoE TensorRT plugin, for onnxruntime via onnxruntime-extensions.

It lets the exact `trt` graph run on a machine without TensorRT or a GPU: the node keeps its op
type, input order, attributes and weight layouts; only its domain is switched to
onnxruntime-extensions' `ai.onnx.contrib` in a validation copy. Inputs are bound by the plugin
contract's names and checked as the real plugin checks them at configure time, so a lowering
that breaks the contract fails here, on CPU. The maths is the MoE op reference; quantized experts
(quant_bits 8 or 4) are first dequantized with `mixexport.quant`, the one scheme the kernels share.

onnxruntime-extensions gives a Python op a fixed input count and needs every declared attribute on
the node, so a quantized node (six inputs) runs as a second op, `MixtralMoE` + QUANTIZED_SUFFIX,
in the validation copy, where absent attributes also get the contract's defaults.
"""

from __future__ import annotations

import numpy as np
import torch

from mixexport.errors import MixexportError
from mixexport.model.moe import moe_reference
from mixexport.quant import QuantScheme, dequantize
from mixexport.targets.trt.contract import attribute_defaults, attribute_names, input_names, plugin_contract

CONTRIB_DOMAIN = "ai.onnx.contrib"
QUANTIZED_SUFFIX = "Quantized"
_registered = False


def quant_scheme(attrs: dict) -> QuantScheme | None:
    """The node's expert quantization from its quant_bits / group_size fields (None: 16-bit weights)."""
    bits = int(attrs.get("quant_bits", 0))
    group = int(attrs.get("group_size", 0))
    if bits == 0:
        if group:
            raise ValueError(f"MixtralMoE group_size={group} without quantized weights (quant_bits=0)")
        return None
    try:
        return QuantScheme(bits, group or None)
    except MixexportError as exc:
        raise ValueError(f"MixtralMoE quant_bits={bits} group_size={group}: {exc}") from None


def check_plugin_inputs(tensors: dict[str, np.ndarray], attrs: dict) -> None:
    """The plugin's configure-time checks: shapes agree with each other and with the fields."""
    x = tensors["x"]
    e, i, h = attrs["num_experts"], attrs["intermediate_size"], attrs["hidden_size"]
    scheme = quant_scheme(attrs)
    per_byte = 1 if scheme is None else 8 // scheme.bits
    expected = {"x": (x.shape[0], h), "router_logits": (x.shape[0], e), "w_gate_up": (e, 2 * i, h // per_byte),
                "w_down": (e, h, i // per_byte)}
    if scheme is not None:
        refusal = scheme.refusal(h, i)
        if refusal:
            raise ValueError(f"MixtralMoE: {refusal}")
        expected.update(s_gate_up=(e, 2 * i, h // scheme.group(h)), s_down=(e, h, i // scheme.group(i)))
    if set(tensors) != set(expected):
        raise ValueError(f"MixtralMoE has inputs {sorted(tensors)}, expected {sorted(expected)} for "
                         f"quant_bits={attrs.get('quant_bits', 0)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"MixtralMoE input {name} has shape {tensors[name].shape}, expected {shape}")
    if not 1 <= attrs["top_k"] <= e:
        raise ValueError(f"MixtralMoE top_k={attrs['top_k']} outside 1..{e}")
    contract = plugin_contract()
    if (attrs["plugin_namespace"], attrs["plugin_version"]) != (contract["plugin_namespace"], contract["plugin_version"]):
        raise ValueError(f"MixtralMoE plugin {attrs['plugin_namespace']}/{attrs['plugin_version']} is not the contract's")


def compute(tensors: dict[str, np.ndarray], attrs: dict) -> np.ndarray:
    """The node's output from its inputs (float32 arrays; quantized weights hold their byte values)."""
    check_plugin_inputs(tensors, attrs)
    t = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in tensors.items()}
    scheme = quant_scheme(attrs)
    w_gate_up, w_down = t["w_gate_up"], t["w_down"]
    if scheme is not None:
        # The validation copy casts the uint8 bytes to float (exact for 0..255); back to bytes here.
        w_gate_up = dequantize(w_gate_up.round().to(torch.uint8), t["s_gate_up"], scheme)
        w_down = dequantize(w_down.round().to(torch.uint8), t["s_down"], scheme)
    return moe_reference(t["x"], t["router_logits"], w_gate_up, w_down, int(attrs["top_k"]),
                         bool(attrs["normalize"])).numpy()


def register() -> str:
    """Register the stand-in ops once per process; returns the custom-op library to load in ORT."""
    global _registered
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise MixexportError("running the trt graph on CPU needs onnxruntime-extensions: "
                             "pip install 'mixexport[test]' or pip install onnxruntime-extensions") from None
    if not _registered:
        str_attrs = {"plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string}
        for quantized in (False, True):
            names = input_names(quantized)
            op_type = plugin_contract()["op_type"] + (QUANTIZED_SUFFIX if quantized else "")
            attrs = {**{name: PyCustomOpDef.dt_int64 for name in attribute_names(quantized)}, **str_attrs}

            # The Python op API takes float32 only; validation wraps fp16 graphs' nodes in Casts.
            @onnx_op(op_type=op_type, inputs=[PyCustomOpDef.dt_float] * len(names), outputs=[PyCustomOpDef.dt_float],
                     attrs=attrs)
            def mixtral_moe(*inputs, _names=names, **attrs):
                return compute(dict(zip(_names, inputs)), attrs)

        _registered = True
    return get_library_path()


def use_cpu_plugin(model, elem_type: int) -> None:
    """Point a trt graph's plugin nodes at the stand-in, in place (an onnx.ModelProto copy).

    The Python op API takes float32 only: for another graph dtype, and for quantized nodes (uint8
    weights), each node gets Casts around it. A quantized node becomes the six-input op and gets
    the contract's defaults for attributes it leaves out.
    """
    import onnx

    contract = plugin_contract()
    nodes = []
    for node in model.graph.node:
        if node.op_type == contract["op_type"] and node.domain == contract["domain"]:
            node.domain = CONTRIB_DOMAIN
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            quantized = attrs.get("quant_bits", 0) != 0
            if quantized:
                node.op_type += QUANTIZED_SUFFIX
                node.attribute.extend(onnx.helper.make_attribute(name, value)
                                      for name, value in attribute_defaults().items() if name not in attrs)
            if elem_type != onnx.TensorProto.FLOAT or quantized:
                cast_in = [f"{name}/as_float" for name in node.input]
                nodes += [onnx.helper.make_node("Cast", [a], [b], to=onnx.TensorProto.FLOAT)
                          for a, b in zip(node.input, cast_in)]
                out = node.output[0]
                node.input[:] = cast_in
                node.output[0] = f"{out}/as_float"
                nodes += [node, onnx.helper.make_node("Cast", [node.output[0]], [out], to=elem_type)]
                continue
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
