"""The built graphs: MoE nodes per target, the plugin contract, the I/O contract, plain onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from artifact.shared import CONFIGS, RANGES, SEED, built, overrides, targets_of
from mixexport import graph_io
from mixexport.capture.moe_op import MOE_DOMAIN
from mixexport.checkpoint.config import preset
from mixexport.driver.build import BuildOptions, build, reference_source
from mixexport.targets.trt.contract import attribute_names, input_names, plugin_contract

ONNX_TYPES = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT,
              "float16": onnx.TensorProto.FLOAT16}
NP_TYPES = {"int64": np.int64, "float32": np.float32, "float16": np.float16}


def _load(name, target, tmp_path_factory):
    out, manifest, _ = built(name, tmp_path_factory)
    experts, top_k, dtype = CONFIGS[name]
    config = preset("tiny").replace(num_local_experts=experts, num_experts_per_tok=top_k, dtype=dtype)
    model = onnx.load(str(out / target / "model.onnx"), load_external_data=False)
    return out, model, config, dtype


def _shape(value):
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)


def _no_mixexport_domain(model):
    assert [n.name for n in model.graph.node if n.domain == MOE_DOMAIN] == []
    assert MOE_DOMAIN not in {o.domain for o in model.opset_import}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_portable_graph_is_standard_onnx(name, tmp_path_factory):
    _, model, config, _ = _load(name, "portable", tmp_path_factory)
    _no_mixexport_domain(model)
    assert [n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")] == []
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    layers = config.num_hidden_layers
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topk) == layers  # every MoE routes with TopK: no dense, unrouted path
    scatter = [n for n in model.graph.node if n.op_type == "ScatterElements"]
    assert len(scatter) == layers
    for i in range(layers):  # each layer's routing is traceable to its source layer
        assert any(n.name.startswith(f"layers.{i}.moe.") for n in topk)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ort_graph_for_cpu_runs_one_if_per_expert(name, tmp_path_factory):
    """The default ort graph (`--ort-provider cpu`): routing, then per layer one If per expert on
    that expert's own pre-transposed weights; no fused MoE node."""
    _, model, config, _ = _load(name, "ort", tmp_path_factory)
    manifest = built(name, tmp_path_factory)[1]
    assert manifest.targets["ort"].extra["provider"] == "cpu" and manifest.targets["ort"].moe_op is None
    _no_mixexport_domain(model)
    assert not [n for n in model.graph.node if n.op_type in ("MoE", "QMoE")]
    layers, e = config.num_hidden_layers, config.num_local_experts
    assert [n.name for n in model.graph.node if n.op_type == "If"] == [
        f"layers.{i}.moe.ort/experts.{x}/If" for i in range(layers) for x in range(e)]
    assert len([n for n in model.graph.node if n.op_type == "TopK"]) == layers
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    i, h = config.intermediate_size, config.hidden_size
    for layer in range(layers):
        for x in range(e):
            assert inits[f"layers.{layer}.moe.experts.{x}.w_gate_up_t"] == (h, 2 * i)
            assert inits[f"layers.{layer}.moe.experts.{x}.w_down_t"] == (i, h)


def test_ort_graph_for_cuda_has_one_contrib_moe_per_layer(tmp_path_factory):
    """`--ort-provider cuda` keeps one fused com.microsoft.MoE per layer; it validates on CPU too."""
    name = "e4-k2-float32"
    out = tmp_path_factory.mktemp("build-cuda") / "out"
    with reference_source(None, "tiny", SEED, overrides(name), lambda _: None) as (ckpt, source):
        manifest = build(ckpt, source, out, BuildOptions(targets=("ort",), ort_provider="cuda", **RANGES),
                         lambda _: None)
    assert manifest.validation["passed"] is True
    assert manifest.targets["ort"].extra["provider"] == "cuda"
    assert manifest.targets["ort"].moe_op == "com.microsoft.MoE"
    genai = json.loads((out / "ort" / "genai_config.json").read_text())  # genai runs it on CUDA
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    experts, top_k, dtype = CONFIGS[name]
    config = preset("tiny").replace(num_local_experts=experts, num_experts_per_tok=top_k, dtype=dtype)
    model = onnx.load(str(out / "ort" / "model.onnx"), load_external_data=False)
    _no_mixexport_domain(model)
    moe = [n for n in model.graph.node if n.op_type == "MoE"]
    assert len(moe) == config.num_hidden_layers
    assert {n.domain for n in moe} == {"com.microsoft"}
    custom = {n.domain for n in model.graph.node} - {"", "com.microsoft"}
    assert custom == set()
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    e, i, h = config.num_local_experts, config.intermediate_size, config.hidden_size
    for node in moe:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"k": config.num_experts_per_tok, "activation_type": b"swiglu", "swiglu_fusion": 1,
                         "normalize_routing_weights": 1}
        assert len(node.input) == 5 and node.input[3] == ""  # no fc3: fc1 holds gate and up
        assert inits[node.input[2]] == (e, 2 * i, h)
        assert inits[node.input[4]] == (e, h, i)


@pytest.mark.parametrize("name", [n for n in CONFIGS if "trt" in targets_of(n)])
def test_trt_graph_plugin_nodes_follow_contract(name, tmp_path_factory):
    _, model, config, _ = _load(name, "trt", tmp_path_factory)
    contract = plugin_contract()
    _no_mixexport_domain(model)
    plugin = [n for n in model.graph.node if n.op_type == "MixtralMoE"]
    assert len(plugin) == config.num_hidden_layers
    assert [n.domain for n in model.graph.node if n.domain != ""] == [contract["domain"]] * len(plugin)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    e, i, h = config.num_local_experts, config.intermediate_size, config.hidden_size
    for layer, node in enumerate(plugin):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert set(attrs) == set(attribute_names()) | {"plugin_namespace", "plugin_version"}
        assert attrs["plugin_namespace"] == b"mixexport" and attrs["plugin_version"] == b"1"
        assert attrs["top_k"] == config.num_experts_per_tok and attrs["normalize"] == 1
        assert (attrs["num_experts"], attrs["hidden_size"], attrs["intermediate_size"]) == (e, h, i)
        assert input_names() == ["x", "router_logits", "w_gate_up", "w_down"]
        x, logits, w_gate_up, w_down = node.input
        assert logits == f"layers.{layer}.moe.router_logits"
        assert w_gate_up == f"layers.{layer}.moe.w_gate_up" and inits[w_gate_up] == (e, 2 * i, h)
        assert w_down == f"layers.{layer}.moe.w_down" and inits[w_down] == (e, h, i)
        assert x not in inits


@pytest.mark.parametrize("name, target", [(n, t) for n in CONFIGS for t in targets_of(n)])
def test_io_names_dtypes_shapes_follow_graph_io(name, target, tmp_path_factory):
    _, model, config, dtype = _load(name, target, tmp_path_factory)
    expected_in = graph_io.inputs(config, dtype)
    expected_out = graph_io.outputs(config, dtype)
    assert [v.name for v in model.graph.input] == [b.name for b in expected_in]
    assert [v.name for v in model.graph.output] == [b.name for b in expected_out]
    for value, binding in zip([*model.graph.input, *model.graph.output], [*expected_in, *expected_out]):
        assert value.type.tensor_type.elem_type == ONNX_TYPES[binding.dtype], binding.name
        assert _shape(value) == binding.shape, binding.name
    # the contract itself: int64 ids, model-dtype cache, float32 logits
    assert [b.dtype for b in expected_in[:3]] == ["int64"] * 3
    assert {b.dtype for b in expected_in[3:]} == {dtype}
    assert expected_out[0].dtype == "float32"
    assert expected_in[3].name == "past_key_values.0.key" and expected_out[-1].name == (
        f"present.{config.num_hidden_layers - 1}.value")


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("name", ["e8-k1-float32", "e4-k1-float16"])
def test_runs_in_plain_onnxruntime(name, target, tmp_path_factory):
    out, _, config, dtype = _load(name, target, tmp_path_factory)
    session = ort.InferenceSession(str(out / target / "model.onnx"), providers=["CPUExecutionProvider"])
    b, p, s = 2, 3, 4
    feed = {"input_ids": np.arange(b * s, dtype=np.int64).reshape(b, s) % config.vocab_size,
            "attention_mask": np.ones((b, p + s), np.int64),
            "position_ids": np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1))}
    rng = np.random.default_rng(0)
    for i in range(config.num_hidden_layers):
        for n in graph_io.past_names(i):
            feed[n] = rng.standard_normal((b, config.num_key_value_heads, p, config.head_dim)).astype(NP_TYPES[dtype])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    assert outputs["logits"].shape == (b, s, config.vocab_size) and outputs["logits"].dtype == np.float32
    assert np.isfinite(outputs["logits"]).all()
    key = outputs["present.0.key"]
    assert key.shape == (b, config.num_key_value_heads, p + s, config.head_dim) and key.dtype == NP_TYPES[dtype]
    np.testing.assert_array_equal(key[:, :, :p], feed["past_key_values.0.key"])  # past is kept as given


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float16_for_cpu_says_it_runs_as_float32(name, tmp_path_factory):
    """onnxruntime's x86 CPU provider has no float16 MatMul: a float16 portable or ort graph for CPU
    says so once per target while building; a float32 build says nothing."""
    lines = built(name, tmp_path_factory)[2]
    notes = [line for line in lines if "no x86 float16 kernels" in line]
    expected = [t for t in ("portable", "ort") if t in targets_of(name)] if CONFIGS[name][2] == "float16" else []
    assert [line.split(":")[0] for line in notes] == expected
    assert all("build --dtype float32" in line for line in notes)
