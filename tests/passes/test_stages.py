"""stages: a target graph cut at layer boundaries; the chained stages compute the whole graph.

Each target's lowered tiny graph is cut into embedding, layer(s) and head stages, every stage
saved and run in onnxruntime (trt: its plugin node through the CPU stand-in, as validation runs
it), each stage fed the previous stage's outputs, on a prefill and on a decode step with a past.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from mixexport import graph_io
from mixexport.errors import MixexportError
from mixexport.passes.stages import cut_stage, cut_stages, layer_stages
from mixexport.targets import TARGETS, backend
from artifact.shared import captured_once
from passes.ort_graphs import decoder_feeds

ELEM = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


@pytest.fixture(scope="module")
def lowered(tiny_checkpoint):
    """target -> (its lowered tiny graph, config)."""
    captured, ckpt = captured_once(tiny_checkpoint)
    graphs = {}
    for target in TARGETS:
        model = captured.clone()
        backend(target).lower(model, ckpt.config.num_hidden_layers)
        graphs[target] = model
    return graphs, ckpt.config


def _session(model: ir.Model, target: str, dtype: str, folder: Path) -> ort.InferenceSession:
    """Save `model` with external data into `folder` and open it as validation does."""
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    ir.save(model, str(path), external_data="model.onnx.data")
    proto = onnx.load(str(path), load_external_data=False)
    backend(target).prepare_validation_model(proto, ELEM[dtype])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    backend(target).configure_session(options)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feed: dict) -> dict:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in wanted})))


@pytest.mark.parametrize("layers_per_stage", [1, 2])
@pytest.mark.parametrize("target", TARGETS)
def test_chained_stages_equal_the_whole_graph(lowered, target, layers_per_stage, tmp_path):
    graphs, config = lowered
    whole = graphs[target]
    stages = layer_stages(config.num_hidden_layers, layers_per_stage)
    assert len(stages) == 2 + -(-config.num_hidden_layers // layers_per_stage)
    stage_models = cut_stages(whole, stages, config, config.dtype)
    whole_session = _session(whole, target, config.dtype, tmp_path / "whole")
    sessions = [_session(m, target, config.dtype, tmp_path / s.name) for s, m in zip(stages, stage_models)]
    for stage, session in zip(stages, sessions):
        assert [i.name for i in session.get_inputs()] == [b.name for b in stage.inputs(config, config.dtype)]
        assert [o.name for o in session.get_outputs()] == [b.name for b in stage.outputs(config, config.dtype)]
    rng = np.random.default_rng(0)
    for past in (0, 5):  # a prefill, then a decode step over a past
        feed = decoder_feeds(config, batch=2, seq=7 if past == 0 else 1, past=past, pad=3, rng=rng)
        want = _run(whole_session, feed)
        chained = dict(feed)
        for session in sessions:
            chained.update(_run(session, chained))
        for name, expected in want.items():
            np.testing.assert_allclose(chained[name], expected, rtol=1e-6, atol=1e-6, err_msg=f"{target} {name}")


def test_stage_holds_only_its_own_weights(lowered):
    graphs, config = lowered
    for target, whole in graphs.items():
        layer1 = cut_stage(whole, graph_io.Stage(1, 2), config, config.dtype, router_logits=True)
        names = set(layer1.graph.initializers)
        assert any(n.startswith("layers.1.") for n in names), target
        assert not [n for n in names if n.startswith(("layers.0.", "embed_tokens", "lm_head", "norm."))], target
        assert [v.name for v in layer1.graph.outputs][-1] == graph_io.router_logits_name(1)
        assert len(list(whole.graph)) > len(list(layer1.graph))  # the whole graph is left as it was


def test_cut_refuses_a_stage_that_needs_another_stages_tensor(lowered):
    """Layer 1 rewired to read layer 0's mid-layer residual: its stage would need layer 0's
    attention, so the cut fails naming a tensor outside its boundary instead of adding inputs."""
    graphs, config = lowered
    model = graphs["ort"].clone()
    values = {out.name: out for node in model.graph for out in node.outputs}
    layer0_output = values[graph_io.hidden_state_name(1)].producer()
    mid_residual = next(v for v in layer0_output.inputs if v.name != graph_io.hidden_state_name(0))
    layer1_output = values[graph_io.hidden_state_name(2)].producer()
    layer1_output.replace_input_with(0, mid_residual)
    with pytest.raises(MixexportError, match=r"stage layers\.1-1 (needs tensor|reads weight) "
                                              r"(past_key_values\.0\.|layers\.0\.|embed_tokens|input_ids)"):
        cut_stage(model, graph_io.Stage(1, 2), config, config.dtype)
    # The layer-0 stage is unaffected.
    cut_stage(model, graph_io.Stage(0, 1), config, config.dtype)


def test_cut_refuses_an_undeclared_graph_input(lowered):
    """A layer-1 node reading layer 0's past: not in layer 1's boundary."""
    graphs, config = lowered
    model = graphs["portable"].clone()
    past0 = next(v for v in model.graph.inputs if v.name == graph_io.past_names(0)[1])
    present1 = next(v for v in model.graph.outputs if v.name == graph_io.present_names(1)[1])
    concat = present1.producer()
    concat.replace_input_with(0, past0)
    with pytest.raises(MixexportError, match=r"stage layers\.1-1 needs tensor past_key_values\.0\.value, which is "
                                              r"not one of its boundary inputs"):
        cut_stage(model, graph_io.Stage(1, 2), config, config.dtype)


def test_the_whole_stage_is_the_whole_graph(lowered):
    """Stage(0, L, embedding, head) keeps every node, the attention-mask check included."""
    graphs, config = lowered
    for target, whole in graphs.items():
        stage = cut_stage(whole, graph_io.Stage(0, config.num_hidden_layers, embedding=True, head=True), config,
                          config.dtype)
        assert [v.name for v in stage.graph.inputs] == [v.name for v in whole.graph.inputs], target
        assert [v.name for v in stage.graph.outputs] == [v.name for v in whole.graph.outputs], target
        assert sorted(n.name for n in stage.graph) == sorted(n.name for n in whole.graph), target
        assert set(stage.graph.initializers) == set(whole.graph.initializers), target
