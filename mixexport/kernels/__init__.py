"""Triton kernels for the MoE op: a sync-free grouped-GEMM pipeline, its custom op, and its AOT build.

Importing this package does not import triton (an optional dependency, `pip install 'mixexport[kernels]'`);
`fused_moe` imports it on first use and says how to install it when it is missing.
"""

from __future__ import annotations

import torch

from mixexport.errors import MixexportError
from mixexport.quant import QuantScheme


def require_triton() -> None:
    """Raise a MixexportError that says how to install triton when it is missing."""
    try:
        import triton  # noqa: F401  (probe only: the kernel modules import what they use)
    except ImportError as exc:
        raise MixexportError("the Triton MoE kernels need triton: pip install 'mixexport[kernels]'") from exc


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              top_k: int, normalize: bool = True, scheme: QuantScheme | None = None,
              scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The MoE op computed by the Triton pipeline (routing, alignment, two grouped GEMMs, reduction).

    Runs natively on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton
    was imported.

    Args:
        x: [N, H] float32, float16 or bfloat16.
        router_logits: [N, E].
        w_gate_up: [E, 2I, H] in x's dtype, gate rows first, then up rows.
        w_down: [E, H, I] in x's dtype.
        top_k: experts per token.
        normalize: renormalize the top-k probabilities (Mixtral does).
        scheme: weight-only quantized experts (`mixexport.quant.QuantScheme`): the weights are then
            `mixexport.quant.quantize`'s uint8 storage, dequantized in the GEMMs' load path.
        scales: with `scheme`, (s_gate_up [E, 2I, H/G], s_down [E, H, I/G]) in x's dtype.

    Returns:
        [N, H] in x's dtype.
    """
    require_triton()
    from mixexport.kernels.pipeline import fused_moe as run

    return run(x, router_logits, w_gate_up, w_down, top_k, normalize, scheme, scales)


@torch.library.custom_op("mixexport::fused_moe_triton", mutates_args=())
def fused_moe_triton(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                     top_k: int, normalize: bool) -> torch.Tensor:
    """`fused_moe` as a torch op, so the reference model can call it under torch.compile / export on CUDA.

    Args:
        x, router_logits, w_gate_up, w_down, top_k, normalize: as for `fused_moe`.

    Returns:
        [N, H] in x's dtype.
    """
    return fused_moe(x, router_logits, w_gate_up, w_down, top_k, normalize)


@fused_moe_triton.register_fake
def _fused_moe_triton_fake(x, router_logits, w_gate_up, w_down, top_k, normalize):
    return torch.empty_like(x)


__all__ = ["fused_moe", "fused_moe_triton", "require_triton"]
