"""The pass pipeline: from the captured graph to one target's graph.

A short, linear list: the common passes, the target's own (`Backend.lowering`), the clean-up.
Each pass reports how many rewrites it made; the MoE lowering must make exactly one per decoder
layer, or the build stops (a lowering that silently matched nothing would ship a graph with an op
no runtime has). Fusions are all-or-nothing passes that say how many rewrites they expect
(`expected`) and, when they decline, why (`reason`); the build stops on a shortfall too, so a
capture change can never silently ship an unfused graph.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from mixexport.capture.moe_op import MOE_DOMAIN
from mixexport.errors import InternalError
from mixexport.passes.check_attention_mask import CheckAttentionMask
from mixexport.passes.fold_weight_transpose import FoldWeightTranspose
from mixexport.passes.name_graph import NameGraph

Step = tuple[str, ir.passes.PassBase]  # (name in the rewrite report, pass)


def run_pipeline(model: ir.Model, target: str, lowering: list[Step], num_layers: int) -> dict[str, int]:
    """Run the common passes around a target's `lowering` in place on `model` (a clone of the
    captured graph).

    Args:
        target: the target's name; its MoE lowering step is named `lower_moe_<target>`.
        lowering: the target's passes, in order.
        num_layers: decoder layers: the MoE lowering must rewrite one node per layer.

    Returns:
        rewrites per pass, in order.
    """
    steps = [
        ("name_graph", NameGraph()),  # contract dim names, router logits names
        ("fold_weight_transpose", FoldWeightTranspose()),  # Linear weights stored transposed
        *lowering,  # the one MoE node per layer -> target ops, then the target's fusions
        ("check_attention_mask", CheckAttentionMask()),  # refuse a mask that is not [B, P+S]
        ("remove_unused", RemoveUnusedNodesPass()),  # leftovers of the rewrites
        ("remove_unused_opsets", RemoveUnusedOpsetsPass()),  # drops the `mixexport` domain import
    ]
    report = {}
    for name, step in steps:
        result = step(model)
        report[name] = getattr(result, "rewrites", int(result.modified))
    lowered = report.get(f"lower_moe_{target}")
    if lowered != num_layers:
        raise InternalError(f"{target} lowering rewrote {lowered} MoE nodes, expected one per layer ({num_layers})")
    for name, step in steps:
        expected = getattr(step, "expected", None)
        if expected is not None and report[name] != expected:
            raise InternalError(f"{name} made {report[name]} rewrites, expected {expected} ({step.sites}): "
                                f"{step.reason}")
    leftover = [n.name for n in model.graph if n.domain == MOE_DOMAIN]
    if leftover:
        raise InternalError(f"{target} graph still holds mixexport nodes: {leftover[:3]}")
    return report
