"""A CPU stand-in for the MixtralMoE TensorRT plugin, for onnxruntime via onnxruntime-extensions.

It lets the exact `trt` graph run on a machine without TensorRT or a GPU: the node keeps its op
type, input order, attributes and weight layouts; only its domain is switched to
onnxruntime-extensions' `ai.onnx.contrib` in a validation copy. Inputs are bound by the plugin
contract's names and checked as the real plugin checks them at configure time, so a lowering
that breaks the contract fails here, on CPU. The maths is the MoE op reference.
"""

from __future__ import annotations

import numpy as np
import torch

from mixexport.errors import MixexportError
from mixexport.model.moe import moe_reference
from mixexport.targets.trt.contract import attribute_names, input_names, plugin_contract

CONTRIB_DOMAIN = "ai.onnx.contrib"
_registered = False


def check_plugin_inputs(tensors: dict[str, np.ndarray], attrs: dict) -> None:
    """The plugin's configure-time checks: shapes agree with each other and with the fields."""
    x, logits, w_gate_up, w_down = (tensors[name] for name in ("x", "router_logits", "w_gate_up", "w_down"))
    e, i, h = attrs["num_experts"], attrs["intermediate_size"], attrs["hidden_size"]
    expected = {"x": (x.shape[0], h), "router_logits": (x.shape[0], e), "w_gate_up": (e, 2 * i, h),
                "w_down": (e, h, i)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"MixtralMoE input {name} has shape {tensors[name].shape}, expected {shape}")
    if not 1 <= attrs["top_k"] <= e:
        raise ValueError(f"MixtralMoE top_k={attrs['top_k']} outside 1..{e}")
    contract = plugin_contract()
    if (attrs["plugin_namespace"], attrs["plugin_version"]) != (contract["plugin_namespace"], contract["plugin_version"]):
        raise ValueError(f"MixtralMoE plugin {attrs['plugin_namespace']}/{attrs['plugin_version']} is not the contract's")


def register() -> str:
    """Register the stand-in op once per process; returns the custom-op library to load in ORT."""
    global _registered
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise MixexportError("running the trt graph on CPU needs onnxruntime-extensions: "
                             "pip install 'mixexport[test]' or pip install onnxruntime-extensions") from None
    if not _registered:
        int_attrs = {name: PyCustomOpDef.dt_int64 for name in attribute_names()}
        str_attrs = {"plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string}

        # The Python op API takes float32 only; validation wraps fp16 graphs' nodes in Casts.
        @onnx_op(op_type=plugin_contract()["op_type"], inputs=[PyCustomOpDef.dt_float] * len(input_names()),
                 outputs=[PyCustomOpDef.dt_float], attrs={**int_attrs, **str_attrs})
        def mixtral_moe(*inputs, **attrs):
            tensors = dict(zip(input_names(), inputs))
            check_plugin_inputs(tensors, attrs)
            t = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in tensors.items()}
            out = moe_reference(t["x"], t["router_logits"], t["w_gate_up"], t["w_down"],
                                int(attrs["top_k"]), bool(attrs["normalize"]))
            return out.numpy()

        _registered = True
    return get_library_path()


def use_cpu_plugin(model, elem_type: int) -> None:
    """Point a trt graph's plugin nodes at the stand-in, in place (an onnx.ModelProto copy).

    The Python op API takes float32 only: for another graph dtype each node gets Casts around it.
    """
    import onnx

    contract = plugin_contract()
    nodes = []
    for node in model.graph.node:
        if node.op_type == contract["op_type"] and node.domain == contract["domain"]:
            node.domain = CONTRIB_DOMAIN
            if elem_type != onnx.TensorProto.FLOAT:
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
