"""The trt target's engine step: profiles and the no-TensorRT path on CPU; the engine on a GPU."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from artifact.shared import built, run_cli
from mixexport import graph_io
from mixexport.errors import MixexportError
from mixexport.artifact.manifest import read_manifest
from mixexport.targets.trt import engine

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()


def _manifest(tmp_path_factory, name="e4-k2-float16"):
    out, manifest, progress = built(name, tmp_path_factory)
    return out, json.loads((out / "manifest.json").read_text()), progress


def test_profiles_cover_prefill_and_decode(tmp_path_factory):
    out, manifest, _ = _manifest(tmp_path_factory)
    context, generation = engine.optimization_profiles(read_manifest(out))
    dims = manifest["dynamic_dims"]
    max_batch, max_seq, max_total = dims["batch"][1], dims["sequence"][1], dims["total_sequence"][1]
    for profile in (context, generation):
        assert list(profile) == [b["name"] for b in manifest["targets"]["trt"]["inputs"]]
        for i in range(3):  # min, opt, max: mask length = past + new tokens in every shape
            seq = profile["input_ids"][i][1]
            past = profile[graph_io.past_names(0)[0]][i][2]
            assert profile["attention_mask"][i][1] == past + seq
            assert profile["position_ids"][i] == profile["input_ids"][i]
    assert context["input_ids"] == ((1, 1), (max(1, max_batch // 2), min(128, max_seq)), (max_batch, max_seq))
    assert {s[2] for s in context[graph_io.past_names(1)[1]]} == {0}
    assert {s[1] for s in generation["input_ids"]} == {1}
    assert generation[graph_io.past_names(0)[0]][0][2] == 1
    assert generation[graph_io.past_names(0)[0]][2][2] == max_total - 1
    kv = manifest["model"]["num_key_value_heads"], manifest["model"]["head_dim"]
    for shape in generation[graph_io.past_names(0)[1]]:
        assert (shape[1], shape[3]) == kv


def test_profile_choice_follows_past_length():
    assert engine.profile_for_past(0) == 0
    assert engine.profile_for_past(1) == 1
    assert engine.profile_for_past(4095) == 1


def test_fp16_build_writes_plugin_kernels(tmp_path_factory):
    out, manifest, _ = _manifest(tmp_path_factory)
    kernels = manifest["targets"]["trt"]["kernels"]
    assert kernels["status"] == "compiled" and kernels["dtype"] == "fp16"
    assert kernels["archs"] == [80, 86, 89, 90]
    index = json.loads((out / "trt" / "kernels" / "index.json").read_text())
    assert {v["arch"] for v in index["variants"]} == {80, 86, 89, 90}
    assert all((out / f["path"]).is_file() for f in kernels["files"])


@pytest.mark.skipif(HAS_TENSORRT and HAS_GPU, reason="TensorRT and a GPU are present: the engine is built")
def test_without_tensorrt_the_build_says_how_to_finish(tmp_path_factory):
    out, manifest, progress = _manifest(tmp_path_factory)
    assert manifest["targets"]["trt"]["engine"]["status"] == "not built"
    text = "\n".join(progress)
    assert "TensorRT-ready ONNX written; no engine here" in text
    assert "-DMIXEXPORT_AOT_DIR=" in text and "mixexport engine" in text


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_engine_command_without_tensorrt_is_a_one_line_error(tmp_path_factory):
    out, _, _ = _manifest(tmp_path_factory)
    result = run_cli("engine", out)
    assert result.exit_code == 1
    assert "TensorRT is not installed" in result.output and "pip install 'mixexport[trt]'" in result.output


def test_plugin_library_search_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(engine.PLUGIN_ENV, raising=False)
    with pytest.raises(Exception, match="cmake -S . -B build -DTensorRT_ROOT="):
        engine.find_plugin_library(None)
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"")
    monkeypatch.setenv(engine.PLUGIN_ENV, str(lib))
    assert engine.find_plugin_library(None) == lib.resolve()


def test_timing_cache_is_keyed_by_gpu_and_tensorrt_version(tmp_path):
    base = tmp_path / "tensorrt.timing.cache"
    h200 = engine.keyed_timing_cache(base, "10.8.0.43", "NVIDIA H200", (9, 0))
    assert h200 == tmp_path / "tensorrt.timing-trt10.8.0.43-nvidia-h200-sm90.cache"
    others = {engine.keyed_timing_cache(base, "10.9.0.34", "NVIDIA H200", (9, 0)),
              engine.keyed_timing_cache(base, "10.8.0.43", "NVIDIA A100-SXM4-80GB", (8, 0)),
              engine.keyed_timing_cache(base, "10.8.0.43", "NVIDIA H200 NVL", (9, 0))}
    assert h200 not in others and len(others) == 3
    assert all(p.parent == tmp_path for p in others | {h200})  # beside the path the user named


def test_engine_file_is_written_from_the_buffer(tmp_path):
    data = bytearray(range(256)) * 1000
    target = tmp_path / "model.engine"
    engine.write_buffer(target, data)
    assert target.read_bytes() == bytes(data) and list(tmp_path.iterdir()) == [target]


def test_engine_write_failure_leaves_no_partial_file(tmp_path):
    class Broken:  # not a buffer: memoryview() raises
        pass

    with pytest.raises(TypeError):
        engine.write_buffer(tmp_path / "model.engine", Broken())
    assert list(tmp_path.iterdir()) == []


def test_plugin_library_that_does_not_load_is_a_user_error(tmp_path):
    fake = tmp_path / "libmixexport_plugins.so"
    fake.write_text("not a shared library")
    with pytest.raises(MixexportError, match=f"cannot load the plugin library {fake}"):
        engine.load_plugin_library(None, fake)


needs_engine = pytest.mark.skipif(not (HAS_TENSORRT and HAS_GPU),
                                  reason="needs TensorRT >= 10 (pip install 'mixexport[trt]') and an NVIDIA GPU")


def _plugin_or_skip():
    try:
        return engine.find_plugin_library(None)
    except Exception as exc:  # noqa: BLE001 - the message says what to build
        pytest.skip(f"plugin library not built: {exc}")


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_engine
def test_engine_passes_parity(tmp_path_factory):
    plugin = _plugin_or_skip()
    out, _, _ = _manifest(tmp_path_factory)
    result = run_cli("engine", out, "--plugin", plugin)
    assert result.exit_code == 0, result.output
    result = run_cli("validate", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "validation.json").read_text())
    assert report["targets"]["trt-engine"]["status"] == "pass"


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_engine
def test_plugin_alone_matches_the_reference(tmp_path):
    """One MixtralMoE node in a TensorRT engine against moe_reference, fp16."""
    import onnx
    from onnx import TensorProto, helper
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, LoadPlugins, NetworkFromOnnxPath,
                                        Profile, TrtRunner)

    from mixexport.model.moe import moe_reference
    from mixexport.targets.trt.contract import input_names, plugin_contract

    plugin = _plugin_or_skip()
    n, h, i, e, k = 7, 64, 96, 8, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=gen).half()
    logits = torch.randn(n, e, generator=gen).half()
    w_gate_up = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).half()
    w_down = (torch.randn(e, h, i, generator=gen) / i**0.5).half()
    contract = plugin_contract()
    node = helper.make_node(contract["op_type"], input_names(), ["y"], domain=contract["domain"], top_k=k,
                            normalize=1, num_experts=e, hidden_size=h, intermediate_size=i,
                            plugin_namespace=contract["plugin_namespace"], plugin_version=contract["plugin_version"])
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", h]),
         helper.make_tensor_value_info("router_logits", TensorProto.FLOAT16, ["N", e])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", h])],
        initializer=[helper.make_tensor("w_gate_up", TensorProto.FLOAT16, w_gate_up.shape,
                                        w_gate_up.numpy().tobytes(), raw=True),
                     helper.make_tensor("w_down", TensorProto.FLOAT16, w_down.shape, w_down.numpy().tobytes(),
                                        raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(contract["domain"], 1)])
    path = tmp_path / "moe.onnx"
    onnx.save(model, str(path))
    profile = Profile().add("x", (1, h), (n, h), (64, h)).add("router_logits", (1, e), (n, e), (64, e))
    build = EngineFromNetwork(NetworkFromOnnxPath(LoadPlugins([str(plugin)], obj=str(path)), strongly_typed=True),
                              CreateConfig(profiles=[profile]))
    with TrtRunner(build) as runner:
        out = runner.infer({"x": x.numpy(), "router_logits": logits.numpy()})["y"]
    want = moe_reference(x.double(), logits.double(), w_gate_up.double(), w_down.double(), k).numpy()
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=2e-2, atol=2e-2)
