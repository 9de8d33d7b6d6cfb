"""Lower `mixexport.MoE` to onnxruntime's fused `com.microsoft.MoE` (CPU and CUDA kernels).

Layout (verified on onnxruntime 1.32 CPU): `activation_type="swiglu"` with `swiglu_fusion=1`
wants fc1 [E, 2I, H] with gate and up rows INTERLEAVED (g0, u0, g1, u1, ...); fc2 is [E, H, I]
as captured; the router logits go in as `router_probs` (the op applies the softmax). Its SwiGLU
defaults (alpha 1, beta 0, no clamp) make it exactly silu(gate) * up.
"""

from __future__ import annotations

import onnx_ir as ir

from mixexport.passes.base import derived_initializer
from mixexport.passes.moe_nodes import MoELowering, MoEMatch, replace_moe

ORT_DOMAIN = "com.microsoft"


def interleave_gate_up(w):
    """[E, 2I, H] gate rows then up rows -> the [E, I, 2, H] view whose flattening is [E, 2I, H]
    with row 2j = gate j, row 2j+1 = up j (a view: the writer lays it out while converting)."""
    e, two_i, h = w.shape
    return w.reshape(e, 2, two_i // 2, h).transpose(0, 2, 1, 3)


def lower_one(graph: ir.Graph, m: MoEMatch) -> None:
    fc1 = derived_initializer(graph, m.w_gate_up, m.name("fc1_interleaved"), interleave_gate_up,
                              tuple(m.w_gate_up.shape))
    node = ir.node("MoE", [m.x, m.router_logits, fc1, None, m.w_down], domain=ORT_DOMAIN,
                   attributes={"k": m.top_k, "activation_type": "swiglu", "swiglu_fusion": 1,
                               "normalize_routing_weights": int(m.normalize)},
                   name=m.name("ort/MoE"))
    replace_moe(graph, m, [node], node.outputs[0])


class LowerMoEToOrt(MoELowering):
    """Replace every `mixexport.MoE` node with one `com.microsoft.MoE` node."""

    domain = ORT_DOMAIN
    lower_one = staticmethod(lower_one)
