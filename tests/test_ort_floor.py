"""benchmarks/ort_floor.py's instruments, made from a real ort artifact of the tiny preset: the
no-routing graph has no routing left and runs, and the matmuls-alone graph multiplies by exactly
the weight bytes a batch-1 decode step reads (decode_speed.active_bytes less the norms and the
embedding row), so its time is that of streaming them."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mixexport.checkpoint import preset
from mixexport.driver.build import BuildOptions, build, reference_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode_speed  # noqa: E402
import ort_floor  # noqa: E402


@pytest.mark.parametrize("overrides", [{}, {"num_local_experts": 3, "num_experts_per_tok": 1}],
                         ids=["tiny", "3-experts-top-1"])
def test_instruments_match_the_artifact(tmp_path, overrides):
    config = preset("tiny").replace(**overrides)
    with reference_source(None, "tiny", 0, overrides, lambda _: None) as (ckpt, source):
        build(ckpt, source, tmp_path / "out", BuildOptions(targets=("ort",), max_context=64), lambda _: None)
    model_path = tmp_path / "out" / "ort" / "model.onnx"
    no_routing, matmuls = ort_floor.write_ablations(model_path)

    graph = onnx.load(str(no_routing), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type in ("If", "TopK") or ".moe.ort/" in n.name]
    assert len([n for n in graph.node if "/floor/" in n.name or n.op_type == "QuickGelu"]) == \
        config.num_experts_per_tok * config.num_hidden_layers  # one activation per expert run
    L, kv, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    runner = decode_speed.OrtRunner(no_routing, L, kv, d)
    ids = torch.tensor([[5, 6, 7]])
    logits, _ = runner.prefill(ids, torch.ones_like(ids), torch.arange(3)[None])
    assert logits.shape[-1] == config.vocab_size and torch.isfinite(logits).all()

    floor = onnx.load(str(matmuls), load_external_data=False).graph
    assert {n.op_type for n in floor.node} <= {"MatMul", "Gemm"}
    item = 4 if config.dtype == "float32" else 2
    H = config.hidden_size
    expected = decode_speed.active_bytes(config, 1) - item * (L * 2 * H + H + H)  # norms, one embedding row
    assert sum(int(np.prod(t.dims)) * item for t in floor.initializer) == expected
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(matmuls), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones(i.shape, np.float32) for i in session.get_inputs()}
    assert len(session.run(None, feeds)) == len(floor.node)
