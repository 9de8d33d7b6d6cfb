"""A hand-built ir.Model holding one `mixexport.MoE` node, and a way to run a lowered copy in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from mixexport.capture.moe_op import MOE_DOMAIN, MOE_OP
from mixexport.model.moe import moe_reference

IR_TYPES = {np.float32: ir.DataType.FLOAT, np.float16: ir.DataType.FLOAT16}


def moe_weights(experts: int, hidden: int, inter: int, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w_gate_up = (rng.standard_normal((experts, 2 * inter, hidden)) / np.sqrt(hidden)).astype(dtype)
    w_down = (rng.standard_normal((experts, hidden, inter)) / np.sqrt(inter)).astype(dtype)
    return w_gate_up, w_down


def single_moe_model(w_gate_up: np.ndarray, w_down: np.ndarray, top_k: int, normalize: bool,
                     layer: int = 0) -> ir.Model:
    """Graph inputs `x` [N, H] and `logits` [N, E], output `y` [N, H]; weights as initializers."""
    dtype = IR_TYPES[w_gate_up.dtype.type]
    e, _, h = w_gate_up.shape
    x = ir.Value(name="x", shape=ir.Shape(["N", h]), type=ir.TensorType(dtype))
    logits = ir.Value(name="logits", shape=ir.Shape(["N", e]), type=ir.TensorType(dtype))
    weights = []
    for what, array in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        name = f"layers.{layer}.moe.{what}"
        weights.append(ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                                const_value=ir.tensor(array, name=name)))
    node = ir.node(MOE_OP, [x, logits, *weights], domain=MOE_DOMAIN,
                   attributes={"top_k": top_k, "normalize": int(normalize)}, name=f"layers.{layer}.moe.MoE")
    y = node.outputs[0]
    y.name, y.shape, y.type = "y", ir.Shape(["N", h]), ir.TensorType(dtype)
    graph = ir.Graph([x, logits], [y], nodes=[node], initializers=weights,
                     opset_imports={"": 18, MOE_DOMAIN: 1}, name="single_moe")
    return ir.Model(graph, ir_version=10)


def serialize(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def run(model: ir.Model, x: np.ndarray, logits: np.ndarray, options: ort.SessionOptions | None = None) -> np.ndarray:
    session = ort.InferenceSession(serialize(model), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x, "logits": logits})[0]


def reference(x, logits, w_gate_up, w_down, top_k, normalize) -> np.ndarray:
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, logits, w_gate_up, w_down)]
    return moe_reference(*t, top_k, normalize).numpy()


def tied_logits(tokens: int, experts: int, seed: int = 1, dtype=np.float32) -> np.ndarray:
    """Router logits where half the rows hold exact ties (all equal, or the top two equal)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((tokens, experts)).astype(dtype)
    logits[0] = 0.0  # every expert tied: lowest indices must win
    logits[1, :] = -1.0
    logits[1, [1, experts - 1]] = 2.0  # tie between expert 1 and the last expert
    logits[2, :] = rng.standard_normal(experts)
    logits[2, [0, 2]] = logits[2].max() + 1.0  # tie for first place
    return logits



def check_non_finite_rule(lowering, dtype=np.float32, tol: float = 1e-5) -> None:
    """Lower a single MoE with `lowering` and run it on router logits with rows that have no softmax
    (a NaN, a +inf, all -inf: the MoE rule makes them NaN rows) and one with a lone -inf among
    finite logits (probability 0: an ordinary row), against the reference."""
    w_gate_up, w_down = moe_weights(4, 16, 12, dtype=dtype)
    x = np.random.default_rng(7).standard_normal((6, 16)).astype(dtype)
    logits = np.random.default_rng(8).standard_normal((6, 4)).astype(dtype)
    logits[1, 2], logits[3, 0], logits[4, :], logits[5, 1] = np.nan, np.inf, -np.inf, -np.inf
    model = single_moe_model(w_gate_up, w_down, top_k=2, normalize=True)
    lowering(model)
    got = run(model, x, logits).astype(np.float32)
    want = reference(x, logits, w_gate_up, w_down, 2, True).astype(np.float32)
    assert np.isnan(got[[1, 3, 4]]).all() and np.isnan(want[[1, 3, 4]]).all()
    np.testing.assert_allclose(got[[0, 2, 5]], want[[0, 2, 5]], atol=tol, rtol=tol)
