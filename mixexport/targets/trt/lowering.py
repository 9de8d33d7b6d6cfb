"""Lower `mixexport.MoE` to the TensorRT plugin node `MixtralMoE` (namespace `mixexport`).

TensorRT's ONNX parser maps an unknown node to a plugin creator by `op_type`, `plugin_version`
and `plugin_namespace`; every other attribute reaches the creator as a plugin field, and
initializer inputs reach the plugin as ordinary tensors. Inputs, attributes and weight layouts
come from the plugin contract file, the same one the C++ plugin is checked against.

Quantized experts (`mixexport.quant`): the same node with `quant_bits` (8 or 4) and `group_size`
(0: one scale per row, int8) and two more inputs, `s_gate_up` [E, 2I, H/G] and `s_down` [E, H, I/G]
in the activation dtype; `w_gate_up` [E, 2I, H*bits/8] and `w_down` [E, H, I*bits/8] are then the
scheme's uint8 storage, gate rows before up rows as in the full-precision node. Without
quantization the node keeps its four inputs and leaves both attributes out (the contract's
default, 0).
"""

from __future__ import annotations

import onnx_ir as ir

from mixexport.errors import InternalError
from mixexport.passes.moe_nodes import MoELowering, MoEMatch, replace_moe
from mixexport.passes.quant_weights import quantized_stack
from mixexport.quant import QuantScheme
from mixexport.targets.trt.contract import attribute_names, input_names, plugin_contract

def _check_against_contract(given: set[str], contract: list[str], what: str) -> None:
    """The fields set are exactly the contract's."""
    if given != set(contract):
        raise InternalError(f"trt lowering sets {what} {sorted(given)}, plugin contract lists {contract}")


def plugin_attributes(m: MoEMatch, quant: QuantScheme | None = None) -> dict:
    """The plugin node's attributes for one MoE match (and its quantization scheme)."""
    values = {"top_k": m.top_k, "normalize": int(m.normalize), "num_experts": m.num_experts,
              "hidden_size": m.hidden, "intermediate_size": m.inter}
    if quant is not None:
        # A full-precision node leaves both out (the contract's default, 0): its graph is what it was.
        values |= {"quant_bits": quant.bits, "group_size": quant.group_size or 0}
    _check_against_contract(set(values), attribute_names(quantized=quant is not None), "attributes")
    contract = plugin_contract()
    return {**values, "plugin_namespace": contract["plugin_namespace"], "plugin_version": contract["plugin_version"]}


def lower_one(graph: ir.Graph, m: MoEMatch, quant: QuantScheme | None) -> None:
    contract = plugin_contract()
    by_name = {"x": m.x, "router_logits": m.router_logits, "w_gate_up": m.w_gate_up, "w_down": m.w_down}
    if quant is not None:
        by_name["w_gate_up"], by_name["s_gate_up"] = quantized_stack(graph, m.w_gate_up, m.name("w_gate_up"), quant)
        by_name["w_down"], by_name["s_down"] = quantized_stack(graph, m.w_down, m.name("w_down"), quant)
    names = input_names(quantized=quant is not None)
    _check_against_contract(set(by_name), names, "inputs")
    node = ir.node(contract["op_type"], [by_name[name] for name in names],
                   domain=contract["domain"], attributes=plugin_attributes(m, quant), name=m.name("trt/MixtralMoE"))
    replace_moe(graph, m, [node], node.outputs[0])


class LowerMoEToTrtPlugin(MoELowering):
    """Replace every `mixexport.MoE` node with a `MixtralMoE` plugin node."""

    domain = plugin_contract()["domain"]
    lower_one = staticmethod(lower_one)
