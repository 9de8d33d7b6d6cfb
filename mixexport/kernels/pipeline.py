"""The fused MoE pipeline: routing -> alignment -> gate/up GEMM -> down GEMM -> top-k reduction.

Six launches, no host synchronization: every grid is a static bound computed from shapes alone, so the
sequence can be captured in a CUDA graph or enqueued by TensorRT. Under TRITON_INTERPRET=1 the same
kernels run on CPU tensors.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from mixexport.errors import MixexportError
from mixexport.kernels.align import launch_align
from mixexport.kernels.configs import INTERPRETER_TILES, gemm_tile, tile_name
from mixexport.kernels.grouped_gemm import launch_down, launch_gate_up
from mixexport.kernels.reduce import launch_topk_reduce
from mixexport.kernels.routing import launch_routing, routing_kernel
from mixexport.quant import QuantScheme

# triton decides between compiling and interpreting when a kernel is decorated (at import), so the
# kernels themselves say which mode this process runs in.
INTERPRETED = not isinstance(routing_kernel, triton.runtime.jit.JITFunction)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(x, router_logits, w_gate_up, w_down, top_k, scales, scheme) -> None:
    if not router_logits.is_floating_point():
        raise MixexportError(f"fused_moe: router_logits has dtype {router_logits.dtype}; pass float logits")
    if x.dtype not in DTYPES:
        raise MixexportError(f"fused_moe: x has dtype {x.dtype}; the kernels take float32, float16 or bfloat16")
    if x.dim() != 2 or router_logits.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise MixexportError(
            f"fused_moe: expected x [N, H], router_logits [N, E], w_gate_up [E, 2I, H], w_down [E, H, I]; got "
            f"{tuple(x.shape)}, {tuple(router_logits.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    inter = two_inter // 2
    if two_inter % 2:
        raise MixexportError(f"fused_moe: w_gate_up has {two_inter} rows per expert; gate and up need an even count")
    # Quantized weights hold bits/8 bytes per element along K and one scale per group of G columns.
    per_byte = 1 if scheme is None else 8 // scheme.bits
    expected = {"router_logits": (num_tokens, num_experts), "w_gate_up": (num_experts, two_inter, hidden // per_byte),
                "w_down": (num_experts, hidden, inter // per_byte)}
    tensors = {"router_logits": router_logits, "w_gate_up": w_gate_up, "w_down": w_down}
    if scheme is not None:
        if scales is None or len(scales) != 2:
            raise MixexportError(f"fused_moe: {scheme.name} weights need their scales (s_gate_up, s_down)")
        refusal = scheme.refusal(hidden, inter)
        if refusal:
            raise MixexportError(f"fused_moe: {refusal}")
        expected["s_gate_up"] = (num_experts, two_inter, hidden // scheme.group(hidden))
        expected["s_down"] = (num_experts, hidden, inter // scheme.group(inter))
        tensors.update(s_gate_up=scales[0], s_down=scales[1])
    elif scales is not None:
        raise MixexportError("fused_moe: scales were given without the quantization scheme they belong to")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise MixexportError(f"fused_moe: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                                 f"from x {tuple(x.shape)} and w_gate_up {tuple(w_gate_up.shape)}")
    for name in ("w_gate_up", "w_down"):
        dtype = tensors[name].dtype
        if scheme is None and dtype != x.dtype:
            raise MixexportError(f"fused_moe: {name} is {dtype} but x is {x.dtype}; the GEMMs take one dtype")
        if scheme is not None and dtype != torch.uint8:
            raise MixexportError(f"fused_moe: {name} is {dtype}; {scheme.name} weights are stored as torch.uint8")
    for name in ("s_gate_up", "s_down"):
        if name in tensors and tensors[name].dtype != x.dtype:
            raise MixexportError(f"fused_moe: {name} is {tensors[name].dtype}; scales are in x's dtype {x.dtype}")
    if not 1 <= top_k <= num_experts:
        raise MixexportError(f"fused_moe: top_k={top_k} must be between 1 and the {num_experts} experts")
    devices = {t.device for t in (x, *tensors.values())}
    if len(devices) != 1:
        raise MixexportError(f"fused_moe: inputs are on several devices ({sorted(map(str, devices))})")
    device = devices.pop()
    if INTERPRETED and device.type != "cpu":
        raise MixexportError("fused_moe: TRITON_INTERPRET=1 runs the kernels on CPU tensors; move the inputs "
                             "to the CPU or unset TRITON_INTERPRET")
    if not INTERPRETED and device.type != "cuda":
        raise MixexportError("fused_moe: the compiled kernels need CUDA tensors; on a CPU set TRITON_INTERPRET=1 "
                             "before triton is imported")


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              top_k: int, normalize: bool = True, scheme: QuantScheme | None = None,
              scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The MoE op (`mixexport.model.moe.moe_reference`) as a chain of Triton kernels.

    Args:
        x: [N, H] float32, float16 or bfloat16.
        router_logits: [N, E] any float dtype.
        w_gate_up: [E, 2I, H] in x's dtype, gate rows first, then up rows; with `scheme`, the uint8
            storage of `mixexport.quant.quantize` [E, 2I, H*bits/8].
        w_down: [E, H, I] in x's dtype; with `scheme`, uint8 [E, H, I*bits/8].
        top_k: experts per token.
        normalize: renormalize the top-k probabilities.
        scheme: the weight-only quantization of both expert weights, None for weights in x's dtype.
        scales: with `scheme`, (s_gate_up [E, 2I, H/G], s_down [E, H, I/G]) in x's dtype.

    Returns:
        [N, H] in x's dtype, accumulated in float32; quantized weights give exactly the result of
        their `mixexport.quant.dequantize` weights rounded to x's dtype.
    """
    _check_inputs(x, router_logits, w_gate_up, w_down, top_k, scales, scheme)
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return torch.empty_like(x)
    num_experts = w_gate_up.shape[0]
    if INTERPRETED:
        tile, upcast = INTERPRETER_TILES[tile_name(num_tokens * top_k, num_experts)], x.dtype == torch.bfloat16
    else:
        major, minor = torch.cuda.get_device_capability(x.device)
        _, tile = gemm_tile(major * 10 + minor, num_tokens * top_k, num_experts)
        upcast = False
    # The kernels compute addresses from the shapes (unit inner strides), so they need dense rows.
    x, router_logits, w_gate_up, w_down = (t.contiguous() for t in (x, router_logits, w_gate_up, w_down))
    s_gate_up, s_down = (None, None) if scales is None else (s.contiguous() for s in scales)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        topk_weights, topk_ids = launch_routing(router_logits, top_k, normalize)
        sorted_ids, expert_ids = launch_align(topk_ids, w_gate_up.shape[0], tile.block_m)
        act = launch_gate_up(x, w_gate_up, sorted_ids, expert_ids, top_k, tile, upcast, s_gate_up, scheme)
        y = launch_down(act, w_down, sorted_ids, expert_ids, topk_weights, tile, upcast, s_down, scheme)
        return launch_topk_reduce(y, top_k, x.dtype)
