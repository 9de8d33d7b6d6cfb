"""Lower `mixexport.MoE` to the TensorRT plugin node `MixtralMoE` (namespace `mixexport`).

TensorRT's ONNX parser maps an unknown node to a plugin creator by `op_type`, `plugin_version`
and `plugin_namespace`; every other attribute reaches the creator as a plugin field, and
initializer inputs reach the plugin as ordinary tensors. Inputs, attributes and weight layouts
come from the plugin contract file, the same one the C++ plugin is checked against.
"""

from __future__ import annotations

import onnx_ir as ir

from mixexport.errors import InternalError
from mixexport.passes.moe_nodes import MoELowering, MoEMatch, replace_moe
from mixexport.targets.trt.contract import attribute_names, input_names, plugin_contract


def plugin_attributes(m: MoEMatch) -> dict:
    values = {"top_k": m.top_k, "normalize": int(m.normalize), "num_experts": m.num_experts,
              "hidden_size": m.hidden, "intermediate_size": m.inter}
    if set(values) != set(attribute_names()):
        raise InternalError(f"trt lowering sets {sorted(values)}, plugin contract lists {attribute_names()}")
    contract = plugin_contract()
    return {**values, "plugin_namespace": contract["plugin_namespace"], "plugin_version": contract["plugin_version"]}


def lower_one(graph: ir.Graph, m: MoEMatch) -> None:
    contract = plugin_contract()
    by_name = {"x": m.x, "router_logits": m.router_logits, "w_gate_up": m.w_gate_up, "w_down": m.w_down}
    node = ir.node(contract["op_type"], [by_name[name] for name in input_names()], domain=contract["domain"],
                   attributes=plugin_attributes(m), name=m.name("trt/MixtralMoE"))
    replace_moe(graph, m, [node], node.outputs[0])


class LowerMoEToTrtPlugin(MoELowering):
    """Replace every `mixexport.MoE` node with a `MixtralMoE` plugin node."""

    domain = plugin_contract()["domain"]
    lower_one = staticmethod(lower_one)
