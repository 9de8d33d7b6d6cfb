"""Fuse every RMSNorm into one opset-23 `RMSNormalization` node (ort target only).

Captured, the reference's `weight * (h * rsqrt(mean(h^2) + eps))` with `h = x.float()` is seven
basic ops (plus a Cast on each side in float16 graphs):

    Pow(h, 2) -> ReduceMean(last axis, keepdims) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(h, .)
    [-> Cast(model dtype)] -> Mul(weight, .)

onnxruntime does not fuse this form at load (its SimplifiedLayerNormFusion wants a Div where the
exporter writes Reciprocal + Mul). `RMSNormalization(x, weight, axis=-1, epsilon=eps)` computes
`x / sqrt(mean(x^2) + eps) * weight` with fp32 statistics (stash_type 1): the same epsilon
placement as the reference. The reference rounds the normalised value to the model dtype before
the weight multiply, the fused op rounds once; in float16 that is at most one ulp.

Why not com.microsoft.SkipSimplifiedLayerNormalization, which would also absorb the residual Add
before each norm: measured on onnxruntime 1.32 CPU (2 threads) it is no faster than
Add + RMSNormalization for one row and 1.6-2x slower for 8 to 32 rows, and it is not a standard op.
Measured again for issue 14 (the two forms interleaved in one process, 2 threads, H 512, load 8):
fp32 6.2 against 6.2 us at 1 row, 8.7 against 7.4 at 8, 17.1 against 11.4 at 32, 107.5 against
72.3 at 256; float16 alike. And only half the norms could take it: the residual Add that ends a
layer is `hidden_states.{i+1}`, where stage graphs are cut (`passes.stages`), so the next layer's
input norm cannot share a node with it.

The norms are found by their weights (`layers.{i}.input_layernorm.weight`,
`layers.{i}.post_attention_layernorm.weight`, `norm.weight`: 2 per layer + 1) and matched from
there with an onnxscript rewriter pattern, in either order of each commutative op's inputs; the
pass declines, with a reason, when any of them does not feed exactly this pattern. Only small
constants (the exponent, axes and epsilon) are read, never a weight.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mixexport.passes.base import AllOrNothingFusion, match_from, require_opset

OPSET = 23  # the first standard opset with RMSNormalization


@dataclasses.dataclass
class NormMatch:
    weight: ir.Value  # [H] scale, model dtype
    x: ir.Value  # [..., H] the value normalised, model dtype
    out: ir.Value  # weight * normalised: what the fused node's output replaces
    at: ir.Node  # the weight's Mul: the fused node goes right before it
    epsilon: float

    def name(self, what: str) -> str:
        return f"{self.weight.name.removesuffix('.weight')}.ort/{what}"


def norm_weights(num_layers: int) -> list[str]:
    """The scale initializer of every RMSNorm in the decoder, in graph order."""
    names = []
    for i in range(num_layers):
        names += [f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"]
    return names + ["norm.weight"]


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A small in-graph constant, also seen through the exporter's `Reshape(Constant, [-1])`.

    Lazy tensors (weights) are never read.
    """
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return None if isinstance(tensor, ir.LazyTensor) else tensor.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Reshape" and len(node.inputs) == 2:
        data, shape = _constant(node.inputs[0]), _constant(node.inputs[1])
        if data is not None and shape is not None:
            return data.reshape(shape)
    return None


def _norm(op, weight, x, exponent, axes, eps):
    """The norm's structure as an onnxscript pattern (`op` builds pattern nodes, the rest are variables)."""
    # h = x.float() and the rounding back to the model dtype: Casts in float16 graphs only. The tags
    # are unused, but `commute` cannot copy an OrValue without one (onnxscript 0.5 to 0.7.2).
    h = pattern.OrValue([op.Cast(x), x], name="h", tag_var="cast_in")
    mean = op.ReduceMean(op.Pow(h, exponent), axes, keepdims=pattern.AttrVar("keepdims", can_match_none=True))
    normed = op.Mul(h, op.Reciprocal(op.Sqrt(op.Add(mean, eps))))
    return op.Mul(weight, pattern.OrValue([op.Cast(normed), normed], tag_var="cast_out"), _outputs=["out"])


# The structure in every order of its commutative Mul, Mul and Add (a rule only to get `commute`:
# nothing is rewritten by it). Constants are checked below: a Constant in the pattern would read
# whatever tensor sits there, a weight included, and would not see through Reshape.
_NORMS = pattern.RewriteRule(_norm, lambda op, **_: None).commute()


def match_rms_norm(graph: ir.Graph, weight_name: str) -> NormMatch | str:
    """The norm scaled by `weight_name`, or why it cannot be fused."""
    weight = graph.initializers.get(weight_name)
    if weight is None:
        return f"no initializer {weight_name}"
    users = [node for node, _ in weight.uses()]
    if len(users) != 1 or users[0].op_type != "Mul" or len(users[0].inputs) != 2:
        return f"{weight_name} is not an input of exactly one Mul"
    found = match_from(_NORMS, graph, users[0])
    if not found:
        return f"{weight_name} does not scale an RMSNorm: {found.reason}"
    x, keep, out = found.bindings["x"], found.bindings["keepdims"], found.bindings["out"]
    exponent, axes, eps = (_constant(found.bindings[name]) for name in ("exponent", "axes", "eps"))
    if exponent is None or exponent.size != 1 or float(exponent.item()) != 2.0:
        return f"{weight_name}: Pow exponent is not 2"
    last = (-1, len(x.shape) - 1 if x.shape is not None else -1)
    if axes is None or axes.size != 1 or int(axes.item()) not in last or (keep is not None and not keep.as_int()):
        return f"{weight_name}: ReduceMean is not over the last axis with keepdims"
    if eps is None or eps.size != 1:
        return f"{weight_name}: expected Add(ReduceMean(...), constant eps)"
    if x.dtype != weight.dtype or out.dtype != weight.dtype:
        return f"{weight_name}: normalised input {x.dtype} and output {out.dtype} are not {weight.dtype}"
    return NormMatch(weight, x, out, users[0], float(eps.item()))


class FuseRMSNormOrt(AllOrNothingFusion):
    """Rewrite every RMSNorm (2 per layer and the final norm) into `RMSNormalization`."""

    sites = "two per layer and the final norm"

    def __init__(self, num_layers: int):
        super().__init__(2 * num_layers + 1)
        self.weights = norm_weights(num_layers)

    def match(self, model: ir.Model) -> list[NormMatch | str]:
        return [match_rms_norm(model.graph, name) for name in self.weights]

    def rewrite(self, model: ir.Model, matches: list[NormMatch]) -> None:
        for m in matches:
            node = ir.node("RMSNormalization", [m.x, m.weight], name=m.name("rms_norm"),
                           attributes={"axis": -1, "epsilon": m.epsilon, "stash_type": 1})
            model.graph.insert_before(m.at, node)
            out = node.outputs[0]
            out.name, out.shape, out.type = m.name("rms_norm"), m.out.shape, m.out.type
            ir.convenience.replace_all_uses_with(m.out, out)
        require_opset(model, OPSET)
