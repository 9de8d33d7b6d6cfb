"""Lower `mixexport.MoE` for onnxruntime: per provider, the form it runs fastest.

Which form (measured on onnxruntime 1.32, one MoE layer of the 214M `mid` model, H 512, I 1792,
E 8, top-2, fp32, 2 threads, median of 200 interleaved runs, shared 2-core VM):
- CPU, full-precision experts: the sparse standard-ONNX form of `passes/sparse_moe.py` (one `If`
  per expert, MatMul on pre-transposed weights): 1.9-2.1 ms against 10.5 ms for the fused
  `com.microsoft.MoE` at 1 token, 15-18 against 27 ms at 8 tokens, 27-63 against 52 ms at 64
  (prefill: within noise of each other). The CPU MoE kernel gives each thread a fixed share of the
  experts and runs each expert on one thread; MatMul in an `If` branch runs on all threads.
  A whole `mid` decode step (batch 1, both graphs interleaved in one process, median of 55 steps)
  gained less on the same machine under a load average of 6-14: 1.0-1.45x in four runs (e.g.
  67.6 against 97.8 ms). With nothing else running (AMD EPYC VM, `benchmarks/decode_speed.py`
  rows "ours ort" and "ours ort fused", best of 4 rounds): 17.99 against 23.22 ms (1.29x), and
  20.04 against 22.19 ms (1.11x) in an earlier run on the same noisy host.
- CPU, quantized experts: `com.microsoft.QMoE` (below): int4 0.67-0.89 ms, faster than
  `MatMulNBits` in `If` branches (0.94-1.02 ms, accuracy_level 0). int8 has no exact fast kernel on
  onnxruntime 1.32 CPU: QMoE without `block_size` takes 9.8-15.6 ms, MatMulNBits bits=8 at
  accuracy_level 0 64-131 ms, DequantizeLinear + Gemm 31 ms; the fast int8 kernels (QMoE with
  `block_size`, MatMulNBits accuracy_level 4: 0.5-0.9 ms) quantize the activations to int8 per
  block (max error 6e-2 on unit-scale outputs), which is not the weight-only scheme every other
  target and the parity reference compute. So exact int8 experts on CPU save memory, not time:
  they run slower than the fp32 sparse form.
- CUDA: one fused `com.microsoft.MoE` / `QMoE` node per layer (onnxruntime's CUDA kernels); an
  `If` per expert there would copy each condition to the host, eight times a layer.

The fused layout (verified on onnxruntime 1.32 CPU): `activation_type="swiglu"` with `swiglu_fusion=1`
wants fc1 [E, 2I, H] with gate and up rows INTERLEAVED (g0, u0, g1, u1, ...); fc2 is [E, H, I]
as captured; the router logits go in as `router_probs` (the op applies the softmax). Its SwiGLU
defaults (alpha 1, beta 0, no clamp) make it exactly silu(gate) * up.

Non-finite router logits: the MoE op's rule (`mixexport.model.moe`) makes a token whose logits
have no softmax (a NaN or +inf, or all -inf) a NaN output row; com.microsoft.MoE returns zeros
there (measured on onnxruntime 1.32 CPU). The lowering restores the rule with a
`Where(IsNaN(ReduceSum(Softmax(logits))), NaN, y)` beside the node: an IEEE softmax is NaN in a
whole row exactly in those cases. It costs a softmax over [N, E] per layer.

Quantized experts (`mixexport.quant`) lower to `com.microsoft.QMoE` instead, with the same
routing, activation and interleaved fc1 rows (verified on onnxruntime 1.32 CPU, int8 and int4
with block 32 and 64, fp32 and fp16, against the dequantized reference to round-off). Its raw
layout (`weights_prepacked=0`) is the scheme's storage as it is: uint8 [E, N, K*bits/8], int4 low
nibble first, no zero-point input (QMoE's implicit zero point is the scheme's 2**(bits-1)); scales
[E, N, K/block_size] with `block_size` (int4), or [E, N] per row without it (int8). Per-row
quantization commutes with the interleave, so fc1 is interleaved before it is quantized.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mixexport.errors import InternalError
from mixexport.passes.base import derived_initializer
from mixexport.passes.moe_nodes import MoELowering, MoEMatch, replace_moe
from mixexport.passes.quant_weights import quantized_stack
from mixexport.passes.sparse_moe import lower_sparse, transposed_matmul
from mixexport.quant import QuantScheme
from mixexport.targets.ort import moe_library

ORT_DOMAIN = "com.microsoft"
# onnxruntime execution providers a build lowers for (`--ort-provider`), the first the default.
PROVIDERS = ("cpu", "cuda")


def interleave_gate_up(w):
    """[E, 2I, H] gate rows then up rows -> the [E, I, 2, H] view whose flattening is [E, 2I, H]
    with row 2j = gate j, row 2j+1 = up j (a view: the writer lays it out while converting)."""
    e, two_i, h = w.shape
    return w.reshape(e, 2, two_i // 2, h).transpose(0, 2, 1, 3)


def _qmoe(graph: ir.Graph, m: MoEMatch, quant: QuantScheme, attributes: dict) -> ir.Node:
    """The QMoE node of one layer, its experts quantized lazily as they are written."""
    fc1, fc1_scales = quantized_stack(graph, m.w_gate_up, m.name("fc1_interleaved"), quant,
                                      relayout=interleave_gate_up, row_scales_2d=True)
    fc2, fc2_scales = quantized_stack(graph, m.w_down, m.name("fc2"), quant, row_scales_2d=True)
    attributes = {**attributes, "expert_weight_bits": quant.bits, "weights_prepacked": 0}
    if quant.group_size is not None:
        attributes["block_size"] = quant.group_size
    return ir.node("QMoE", [m.x, m.router_logits, fc1, fc1_scales, None, fc2, fc2_scales], domain=ORT_DOMAIN,
                   attributes=attributes, name=m.name("ort/QMoE"))


def uses_sparse_form(quant: QuantScheme | None, provider: str) -> bool:
    """Whether the MoE lowers to the sparse standard-ONNX form (else one fused contrib node)."""
    return quant is None and provider == "cpu"


def lower_fused(graph: ir.Graph, m: MoEMatch, quant: QuantScheme | None) -> None:
    """One `com.microsoft.MoE` (quantized: `QMoE`) node for the MoE, plus the non-finite rule."""
    attributes = {"k": m.top_k, "activation_type": "swiglu", "swiglu_fusion": 1,
                  "normalize_routing_weights": int(m.normalize)}
    if quant is not None:
        node = _qmoe(graph, m, quant, attributes)
    else:
        fc1 = derived_initializer(graph, m.w_gate_up, m.name("fc1_interleaved"), interleave_gate_up,
                                  tuple(m.w_gate_up.shape))
        node = ir.node("MoE", [m.x, m.router_logits, fc1, None, m.w_down], domain=ORT_DOMAIN,
                       attributes=attributes, name=m.name("ort/MoE"))
    tape = ir.tape.Tape()
    probs = tape.op("Softmax", [m.router_logits], {"axis": -1}, name=m.name("ort/no_softmax/Softmax"))
    axes = tape.op("Constant", [], {"value": ir.tensor(np.array([-1], np.int64))}, name=m.name("ort/no_softmax/axes"))
    total = tape.op("ReduceSum", [probs, axes], {"keepdims": 1}, name=m.name("ort/no_softmax/ReduceSum"))
    no_softmax = tape.op("IsNaN", [total], name=m.name("ort/no_softmax/IsNaN"))
    nan = tape.op("Constant", [], {"value": ir.tensor(np.array(np.nan, m.dtype.numpy()))},
                  name=m.name("ort/no_softmax/nan"))
    y = tape.op("Where", [no_softmax, nan, node.outputs[0]], name=m.name("ort/no_softmax/Where"))
    for extra in tape.nodes:
        extra.outputs[0].name = extra.name
    replace_moe(graph, m, [node, *tape.nodes], y)


class LowerMoEToOrt(MoELowering):
    """Replace every `mixexport.MoE` node with the form `provider` runs fastest (module docstring):
    the sparse form for full-precision experts on CPU, else one `com.microsoft.MoE` (quantized:
    `QMoE`) node.

    With `library`, every MoE node becomes the CPU op library's `mixexport.ort.MoE` instead
    (`moe_library.py`; CPU, full-precision experts only).

    Args:
        quant: the experts' quantization scheme (None: experts in the model dtype).
        provider: the onnxruntime execution provider the graph is for, one of `PROVIDERS`.
        library: lower to the op of the CPU MoE library (`build --ort-moe-library`).
    """

    def __init__(self, quant: QuantScheme | None = None, provider: str = PROVIDERS[0], library: bool = False):
        if provider not in PROVIDERS:
            raise InternalError(f"unknown onnxruntime provider {provider!r} (one of {PROVIDERS})")
        if library and (quant is not None or provider != "cpu"):
            raise InternalError("the CPU MoE library is for full-precision experts on the cpu provider")
        super().__init__(quant)
        self.provider = provider
        self.library = library
        if library:
            self.domain = moe_library.DOMAIN
        else:
            self.domain = None if uses_sparse_form(quant, provider) else ORT_DOMAIN

    def lower_one(self, graph: ir.Graph, m: MoEMatch, quant: QuantScheme | None) -> None:
        if self.library:
            moe_library.lower_to_library(graph, m)
        elif uses_sparse_form(quant, self.provider):
            lower_sparse(graph, m, transposed_matmul, "ort")
        else:
            lower_fused(graph, m, quant)
