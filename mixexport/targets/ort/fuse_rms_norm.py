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

The norms are found by their weights (`layers.{i}.input_layernorm.weight`,
`layers.{i}.post_attention_layernorm.weight`, `norm.weight`: 2 per layer + 1); the pass declines,
with a reason, when any of them does not feed exactly this pattern. Only small constants (the
exponent, axes and epsilon) are read, never a weight.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from mixexport.passes.base import AllOrNothingFusion, require_opset

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


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _through_cast(value: ir.Value) -> ir.Value:
    """The input of a Cast producing `value`, or `value` itself."""
    cast = _producer(value, "Cast")
    return cast.inputs[0] if cast is not None else value


def match_rms_norm(graph: ir.Graph, weight_name: str) -> NormMatch | str:
    """The norm scaled by `weight_name`, or why it cannot be fused."""
    weight = graph.initializers.get(weight_name)
    if weight is None:
        return f"no initializer {weight_name}"
    users = [node for node, _ in weight.uses()]
    if len(users) != 1 or users[0].op_type != "Mul" or len(users[0].inputs) != 2:
        return f"{weight_name} is not an input of exactly one Mul"
    scale = users[0]
    normed = _through_cast(scale.inputs[1] if scale.inputs[0] is weight else scale.inputs[0])
    mul = _producer(normed, "Mul")
    if mul is None:
        return f"{weight_name} does not scale a Mul (x * rsqrt)"
    for rsqrt_side in (0, 1):
        reciprocal = _producer(mul.inputs[rsqrt_side], "Reciprocal")
        if reciprocal is not None:
            h = mul.inputs[1 - rsqrt_side]
            break
    else:
        return f"{weight_name}: the normalising Mul has no Reciprocal input"
    sqrt = _producer(reciprocal.inputs[0], "Sqrt")
    add = _producer(sqrt.inputs[0] if sqrt else None, "Add")
    if add is None:
        return f"{weight_name}: expected Reciprocal(Sqrt(Add(mean, eps)))"
    mean_side = next((i for i, v in enumerate(add.inputs) if _producer(v, "ReduceMean") is not None), None)
    eps = _constant(add.inputs[1 - mean_side]) if mean_side is not None else None
    if eps is None or eps.size != 1:
        return f"{weight_name}: expected Add(ReduceMean(...), constant eps)"
    mean = add.inputs[mean_side].producer()
    pow_ = _producer(mean.inputs[0], "Pow")
    if pow_ is None or pow_.inputs[0] is not h:
        return f"{weight_name}: the mean is not over Pow(x, 2) of the normalised x"
    exponent = _constant(pow_.inputs[1])
    axes = _constant(mean.inputs[1]) if len(mean.inputs) > 1 else None
    rank = len(h.shape) if h.shape is not None else None
    keepdims = mean.attributes["keepdims"].as_int() if "keepdims" in mean.attributes else 1
    if exponent is None or exponent.size != 1 or float(exponent.item()) != 2.0:
        return f"{weight_name}: Pow exponent is not 2"
    if axes is None or axes.size != 1 or int(axes.item()) not in (-1, (rank or 0) - 1) or not keepdims:
        return f"{weight_name}: ReduceMean is not over the last axis with keepdims"
    x = _through_cast(h)
    if x.dtype != weight.dtype or scale.outputs[0].dtype != weight.dtype:
        return f"{weight_name}: normalised input {x.dtype} and output {scale.outputs[0].dtype} are not {weight.dtype}"
    return NormMatch(weight, x, scale.outputs[0], scale, float(eps.item()))


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
