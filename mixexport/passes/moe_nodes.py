"""Find the captured MoE nodes and check that a lowering can take them (pattern + check)."""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from mixexport.capture.moe_op import MOE_DOMAIN, MOE_OP
from mixexport.passes.base import RewriteResult, require_opset
from mixexport.quant import QuantScheme

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclasses.dataclass
class MoEMatch:
    """A `mixexport.MoE` node and what a lowering needs to know about it."""

    node: ir.Node
    layer: int
    x: ir.Value  # [N, H]
    router_logits: ir.Value  # [N, E]
    w_gate_up: ir.Value  # [E, 2I, H] initializer
    w_down: ir.Value  # [E, H, I] initializer
    top_k: int
    normalize: bool

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_gate_up.shape[2]

    @property
    def inter(self) -> int:
        return self.w_gate_up.shape[1] // 2

    @property
    def dtype(self) -> ir.DataType:
        return self.w_gate_up.dtype

    def name(self, what: str) -> str:
        """A node or value name traceable to the source layer."""
        return f"layers.{self.layer}.moe.{what}"


def match_moe(node: ir.Node) -> MoEMatch | str:
    """The match for a MoE node, or the reason it cannot be lowered."""
    if node.domain != MOE_DOMAIN or node.op_type != MOE_OP:
        return "not a mixexport.MoE node"
    if len(node.inputs) != 4 or any(v is None for v in node.inputs):
        return f"{node.name}: expected 4 inputs, found {len(node.inputs)}"
    x, logits, w_gate_up, w_down = node.inputs
    for w in (w_gate_up, w_down):
        if w.const_value is None or not w.is_initializer():
            return f"{node.name}: expert weights {w.name} are not an initializer"
        if w.shape is None or len(w.shape) != 3:
            return f"{node.name}: expert weights {w.name} must be 3-D"
    found = _LAYER.search(w_gate_up.name or "")
    if found is None:
        return f"{node.name}: cannot tell the layer from weight name {w_gate_up.name!r}"
    e, two_i, h = w_gate_up.shape
    if tuple(w_down.shape) != (e, h, two_i // 2):
        return f"{node.name}: w_down shape {w_down.shape} does not match w_gate_up {w_gate_up.shape}"
    return MoEMatch(node, int(found.group(1)), x, logits, w_gate_up, w_down,
                    top_k=node.attributes["top_k"].as_int(), normalize=bool(node.attributes["normalize"].as_int()))


def find_moe(graph: ir.Graph) -> list[MoEMatch]:
    """Every lowerable MoE node in graph order.

    Raises:
        InternalError: when a MoE node exists that no lowering could take (capture produced
            something unexpected): silently leaving it would ship a broken artifact.
    """
    from mixexport.errors import InternalError

    matches = []
    for node in graph:
        if node.domain == MOE_DOMAIN and node.op_type == MOE_OP:
            match = match_moe(node)
            if isinstance(match, str):
                raise InternalError(f"cannot lower MoE node: {match}")
            matches.append(match)
    return matches


def replace_moe(graph: ir.Graph, match: MoEMatch, new_nodes: list[ir.Node], output: ir.Value) -> None:
    """Swap the MoE node for its lowering and drop expert weights nothing uses any more."""
    for node in new_nodes:
        if not node.name:
            node.name = match.name(node.op_type)
    ir.convenience.replace_nodes_and_values(graph, match.node, [match.node], new_nodes,
                                            [match.node.outputs[0]], [output])
    for weight in (match.w_gate_up, match.w_down):
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)


class MoELowering(ir.passes.InPlacePass):
    """A pass that rewrites every `mixexport.MoE` node with `lower_one`, one rewrite per node.

    Subclasses set `lower_one(graph, match, quant)`, the opset `domain` their nodes need (if any)
    and `quant_opset`, the default-domain opset their quantized form needs (if any).

    Args:
        quant: the experts' quantization scheme (None: experts in the model dtype).
    """

    domain: str | None = None
    quant_opset: int | None = None

    def __init__(self, quant: QuantScheme | None = None):
        super().__init__()
        self.quant = quant

    @staticmethod
    def lower_one(graph: ir.Graph, m: MoEMatch, quant: QuantScheme | None) -> None:
        raise NotImplementedError

    def call(self, model: ir.Model) -> RewriteResult:
        matches = find_moe(model.graph)
        for m in matches:
            self.lower_one(model.graph, m, self.quant)
        if matches and self.domain:
            model.opset_imports.setdefault(self.domain, 1)
        if matches and self.quant and self.quant_opset:
            require_opset(model, self.quant_opset)
        return RewriteResult(model, bool(matches), rewrites=len(matches))
