"""fold_weight_transpose: Transpose(initializer) becomes a pre-transposed initializer; numerics unchanged."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from mixexport.passes.fold_weight_transpose import FoldWeightTranspose
from passes.single_moe import serialize

FLOAT = ir.DataType.FLOAT


def _model():
    """y = x @ W1^T (default perm) + (x @ W2^T via perm) ; plus a Transpose of an activation (not foldable)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((5, 4)).astype(np.float32)
    w2 = rng.standard_normal((5, 4)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape([3, 4]), type=ir.TensorType(FLOAT))
    inits = [ir.Value(name=n, shape=ir.Shape(a.shape), type=ir.TensorType(FLOAT), const_value=ir.tensor(a, name=n))
             for n, a in (("w1", w1), ("w2", w2))]
    tape = ir.tape.Tape()
    a = tape.op("MatMul", [x, tape.op("Transpose", [inits[0]])])
    b = tape.op("MatMul", [x, tape.op("Transpose", [inits[1]], {"perm": [1, 0]})])
    y = tape.op("Transpose", [tape.op("Add", [a, b])], {"perm": [1, 0]})  # activation: left alone
    y.name, y.shape, y.type = "y", ir.Shape([5, 3]), ir.TensorType(FLOAT)
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=inits, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _run(model, x):
    return ort.InferenceSession(serialize(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_folds_initializer_transposes_only():
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    model = _model()
    before = _run(model, x)
    result = FoldWeightTranspose()(model)
    assert result.modified and result.rewrites == 2
    assert [n.op_type for n in model.graph].count("Transpose") == 1  # the activation's
    assert set(model.graph.initializers) == {"w1_t", "w2_t"}
    assert tuple(model.graph.initializers["w1_t"].shape) == (4, 5)
    np.testing.assert_array_equal(_run(model, x), before)


def test_second_run_changes_nothing():
    model = _model()
    FoldWeightTranspose()(model)
    again = FoldWeightTranspose()(model)
    assert not again.modified and again.rewrites == 0
