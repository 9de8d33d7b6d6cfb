"""`mixexport::moe`: the MoE op as a torch custom op that exports as ONE ONNX node.

Hugging Face's MoE forward does not export cleanly (data-dependent loops), so capture keeps each
MoE block opaque: torch.export sees a custom op with a fake (shape-only) implementation, and the
ONNX translation emits a single `mixexport.MoE` node that the passes later lower per target.
Eagerly the op runs the reference, so the captured model computes exactly what the reference does.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch

from mixexport.model.moe import moe_reference

MOE_DOMAIN = "mixexport"
MOE_OP = "MoE"
MOE_VERSION = 1
# Input order of the captured node; the same order as moe_reference's tensor arguments.
MOE_INPUTS = ("x", "router_logits", "w_gate_up", "w_down")


@torch.library.custom_op("mixexport::moe", mutates_args=())
def moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
        top_k: int, normalize: bool) -> torch.Tensor:
    return moe_reference(x, router_logits, w_gate_up, w_down, top_k, normalize)


@moe.register_fake
def _moe_fake(x, router_logits, w_gate_up, w_down, top_k, normalize):
    return torch.empty_like(x)


def _register_schema() -> None:
    # The exporter only emits a node in a custom domain once ONNX knows a schema for it.
    if onnx.defs.has(MOE_OP, MOE_DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    schema = onnx.defs.OpSchema(
        MOE_OP, MOE_DOMAIN, MOE_VERSION,
        doc="Top-k mixture of experts with SwiGLU experts; see mixexport/model/moe.py.",
        inputs=[param(name, "T") for name in MOE_INPUTS],
        outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=[attr("top_k", onnx.defs.OpSchema.AttrType.INT, "experts per token"),
                    attr("normalize", onnx.defs.OpSchema.AttrType.INT, "renormalize top-k weights (1/0)")],
    )
    onnx.defs.register_schema(schema)


_register_schema()
_opset = onnxscript.values.Opset(MOE_DOMAIN, MOE_VERSION)


def moe_translation(x, router_logits, w_gate_up, w_down, top_k: int, normalize: bool):
    """ONNX translation of `mixexport::moe` for torch.onnx's custom_translation_table."""
    return _opset.MoE(x, router_logits, w_gate_up, w_down, top_k=top_k, normalize=int(normalize))


TRANSLATION_TABLE = {torch.ops.mixexport.moe.default: moe_translation}
