"""fuse_rms_norm_ort: the ops it removes, declines with a reason, numerics against the unfused graph.

Both graph dtypes: in float16 the captured norm also holds a Cast on each side (fp32 statistics).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from artifact.shared import captured_once
from mixexport.errors import InternalError
from mixexport.targets.ort.fuse_attention import FuseAttentionOrt
from mixexport.targets.ort.fuse_rms_norm import FuseRMSNormOrt
from mixexport.targets import backend
from passes.ort_graphs import assert_fused_matches_unfused, ort_graph, session

# fused vs unfused: fp32 to round-off; fp16 differs by the one rounding the fused op leaves out
# (seen: 2.4e-4 at most; validation allows 2e-2 against the reference).
TOLERANCES = {"float32": (1e-5, 1e-4), "float16": (2e-3, 2e-3)}


@pytest.fixture(scope="module", params=["float32", "float16"])
def captured(request, checkpoint_factory, tiny_config):
    config = tiny_config.replace(dtype=request.param)
    model, _ = captured_once(checkpoint_factory(config))
    return model, config


def norms(config) -> int:
    return 2 * config.num_hidden_layers + 1


def test_rewrite_replaces_each_norm(captured):
    model, config = captured
    layers = config.num_hidden_layers
    before = ort_graph(model, FuseAttentionOrt(layers))
    fusion = FuseRMSNormOrt(layers)
    after = ort_graph(model, FuseAttentionOrt(layers), fusion)
    ops_before, ops_after = Counter(n.op_type for n in before.graph), Counter(n.op_type for n in after.graph)
    n = norms(config)
    assert fusion.expected == n and fusion.reason is None
    assert ops_after["RMSNormalization"] == n
    removed = {"Pow": n, "ReduceMean": n, "Sqrt": n, "Reciprocal": n, "Add": n, "Mul": 2 * n}
    if config.dtype == "float16":
        removed["Cast"] = 2 * n  # to fp32 for the statistics, back before the weight multiply
    gone = ops_before - ops_after
    assert {op: gone[op] for op in removed} == removed
    assert set(gone) - set(removed) <= {"Constant", "Reshape"}  # the pattern's exponent, axes and eps
    assert ops_after["ReduceMean"] == ops_after["Sqrt"] == 0  # RoPE's inverse frequencies keep one Pow
    fused = [node for node in after.graph if node.op_type == "RMSNormalization"]
    assert [node.name for node in fused[:2]] == ["layers.0.input_layernorm.ort/rms_norm",
                                                 "layers.0.post_attention_layernorm.ort/rms_norm"]
    assert fused[-1].name == "norm.ort/rms_norm" and fused[-1].inputs[1].name == "norm.weight"
    attributes = {k: a.value for k, a in fused[0].attributes.items()}
    assert attributes == {"axis": -1, "epsilon": pytest.approx(config.rms_norm_eps), "stash_type": 1}
    assert fused[0].inputs[0].dtype == fused[0].outputs[0].dtype == ir.DataType.from_numpy(np.dtype(config.dtype))
    assert after.opset_imports[""] == 23
    # weights were re-wired, not read: still the lazy tensors capture attached
    assert isinstance(after.graph.initializers["norm.weight"].const_value, ir.LazyTensor)


def test_pipeline_runs_it_for_ort_only(captured):
    model, config = captured
    for target in ("ort", "portable"):
        lowered = model.clone()
        report = backend(target).lower(lowered, config.num_hidden_layers)
        fused = sum(n.op_type == "RMSNormalization" for n in lowered.graph)
        assert (report.get("fuse_rms_norm_ort"), fused) == ((norms(config),) * 2 if target == "ort" else (None, 0))


def declined(model: ir.Model, layers: int) -> str:
    fusion = FuseRMSNormOrt(layers)
    result = fusion(model)
    assert result.rewrites == 0 and not result.modified
    assert not any(n.op_type == "RMSNormalization" for n in model.graph)  # all or nothing
    return fusion.reason


def test_declines_missing_weight_and_pipeline_fails(captured):
    model, config = captured
    layers = config.num_hidden_layers
    graph = ort_graph(model)
    graph.graph.initializers["layers.1.post_attention_layernorm.weight"].name = "renamed"
    assert declined(graph, layers) == "no initializer layers.1.post_attention_layernorm.weight"
    broken = model.clone()
    broken.graph.initializers["norm.weight"].name = "renamed"
    with pytest.raises(InternalError, match=r"fuse_rms_norm_ort made 0 rewrites, expected 5 \(two per layer and "
                                            r"the final norm\): no initializer norm.weight"):
        backend("ort").lower(broken, layers)


def test_declines_a_weight_used_twice(captured):
    model, config = captured
    graph = ort_graph(model)
    weight = graph.graph.initializers["layers.0.input_layernorm.weight"]
    graph.graph.append(ir.node("Mul", [weight, weight], name="extra_use"))
    assert declined(graph, config.num_hidden_layers) == "layers.0.input_layernorm.weight is not an input of exactly one Mul"


def test_declines_another_exponent(captured):
    model, config = captured
    graph = ort_graph(model)
    pow_ = next(n for n in graph.graph if n.op_type == "Pow" and n.inputs[0].shape is not None
                and n.inputs[0].shape[-1] == config.hidden_size)
    cube = ir.Value(name="three", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                    const_value=ir.tensor(np.array(3, np.float32), name="three"))  # statistics are fp32
    graph.graph.register_initializer(cube)
    pow_.replace_input_with(1, cube)
    assert declined(graph, config.num_hidden_layers) == "layers.0.input_layernorm.weight: Pow exponent is not 2"



NORM_OPS = ("Cast", "Mul", "Reciprocal", "Sqrt", "Add", "ReduceMean", "Pow")


def first_norm(graph: ir.Graph) -> dict[str, ir.Node]:
    """Layer 0's input norm by op type: its Muls as `scale` (by the weight) and `normalise` (x * rsqrt)."""
    scale = next(node for node, _ in graph.initializers["layers.0.input_layernorm.weight"].uses())
    nodes, todo = {"scale": scale}, [scale]
    while todo:
        for value in todo.pop().inputs:
            node = value.producer() if value is not None else None
            if node is not None and node.op_type in NORM_OPS:
                nodes.setdefault("normalise" if node.op_type == "Mul" else node.op_type, node)
                todo.append(node)
    return nodes


def test_matches_either_order_of_commutative_inputs(captured):
    model, config = captured
    graph = ort_graph(model)
    for node in (first_norm(graph.graph)[op] for op in ("scale", "normalise", "Add")):
        a, b = node.inputs
        node.replace_input_with(0, b)
        node.replace_input_with(1, a)
    fusion = FuseRMSNormOrt(config.num_hidden_layers)
    assert fusion(graph).rewrites == norms(config) and fusion.reason is None


def test_declines_another_structure(captured):
    model, config = captured
    graph = ort_graph(model)
    first_norm(graph.graph)["Reciprocal"].op_type = "Neg"
    assert declined(graph, config.num_hidden_layers) == (
        "layers.0.input_layernorm.weight does not scale an RMSNorm: OpType mismatch: expected Reciprocal, got Neg.")


def test_reads_no_tensor_where_a_constant_belongs(captured):
    model, config = captured
    graph = ort_graph(model)

    def read():
        raise AssertionError("the matcher read a lazy tensor")

    lazy = ir.Value(name="lazy", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                    const_value=ir.LazyTensor(read, dtype=ir.DataType.FLOAT, shape=ir.Shape([]), name="lazy"))
    graph.graph.register_initializer(lazy)
    first_norm(graph.graph)["Pow"].replace_input_with(1, lazy)  # a weight where the exponent belongs
    assert declined(graph, config.num_hidden_layers) == "layers.0.input_layernorm.weight: Pow exponent is not 2"


@pytest.fixture(scope="module")
def sessions(captured, tmp_path_factory):
    model, config = captured
    layers = config.num_hidden_layers
    root = tmp_path_factory.mktemp(f"fuse_rms_norm_{config.dtype}")
    return (session(ort_graph(model, FuseAttentionOrt(layers)), root / "unfused.onnx"),
            session(ort_graph(model, FuseAttentionOrt(layers), FuseRMSNormOrt(layers)), root / "fused.onnx"))


@pytest.mark.parametrize("batch,seq,past,pad", [
    (1, 1, 9, 0),  # decode, batch 1
    (2, 7, 0, 3),  # left-padded prefill
    (3, 2, 5, 2),  # chunked prefill with a past
])
def test_numerics_match_unfused(captured, sessions, batch, seq, past, pad):
    _, config = captured
    assert_fused_matches_unfused(config, sessions, batch, seq, past, pad, *TOLERANCES[config.dtype])
