"""fold_ort: onnxruntime finds nothing to fold or fuse in the ort graph at load, no weight is read
while folding, and the numbers are the unfolded graph's."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from artifact.shared import captured_with_weights
from mixexport import graph_io
from mixexport.targets import backend
from mixexport.targets.ort.fold import FoldForOrt
from mixexport.targets.ort.fuse_attention import FuseAttentionOrt
from mixexport.targets.ort.fuse_qkv import FuseQkvOrt
from mixexport.targets.ort.fuse_rms_norm import FuseRMSNormOrt
from passes.ort_graphs import decoder_feeds, ort_graph, run_both, session
from targets.ort.test_fuse_attention import CONFIG, LAYERS


@pytest.fixture(scope="module")
def captured(checkpoint_factory):
    model, _ = captured_with_weights(checkpoint_factory(CONFIG))
    return model


def ops(model: onnx.ModelProto) -> Counter:
    """Op types of every node, If branches included."""
    def walk(graph):
        for node in graph.node:
            yield node.op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
    return Counter(walk(model.graph))


@pytest.mark.parametrize("kv_layout", ["concat", "shared"])
def test_onnxruntime_has_nothing_left_to_fold(captured, kv_layout, tmp_path):
    """The graph onnxruntime runs after its load-time optimizations is ours, op for op (float32:
    float16 graphs get Casts on x86, which are not folds). The mask check, added after this pass,
    keeps its Constant nodes: onnxruntime makes them initializers."""
    model = captured.clone()
    report = backend("ort").lower(model, LAYERS, kv=graph_io.KvLayout(kv_layout, CONFIG.sliding_window))
    assert report["fold_ort"] > 0
    path = tmp_path / "model.onnx"
    ir.save(model, str(path), external_data="model.onnx.data")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ours, theirs = ops(onnx.load(str(path), load_external_data=False)), ops(
        onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False))
    ours.pop("Constant")
    assert theirs == ours
    assert ours["QuickGelu"] == LAYERS * CONFIG.num_local_experts and ours["Sigmoid"] == 0


def test_reads_no_weight(captured):
    """Folding never evaluates a weight: every lazy initializer raises when read, and the lowering runs."""
    model = captured.clone()

    def unreadable(value):
        def read():
            raise AssertionError(f"{value.name} was read while lowering")
        return ir.LazyTensor(read, dtype=value.const_value.dtype, shape=value.const_value.shape, name=value.name)

    for value in model.graph.initializers.values():
        if value.const_value is not None and value.const_value.size > 64:
            value.const_value = unreadable(value)
    assert backend("ort").lower(model, LAYERS)["fold_ort"] > 0


@pytest.fixture(scope="module")
def sessions(captured, tmp_path_factory):
    root = tmp_path_factory.mktemp("fold")
    fusions = (FuseAttentionOrt(LAYERS), FuseQkvOrt(LAYERS), FuseRMSNormOrt(LAYERS))
    return (session(ort_graph(captured, *fusions), root / "unfolded.onnx"),
            session(ort_graph(captured, *fusions, FoldForOrt()), root / "folded.onnx"))


@pytest.mark.parametrize("batch,seq,past,pad", [(1, 1, 9, 0), (2, 7, 0, 3), (2, 3, 5, 2)])
def test_numerics_are_the_unfolded_graphs(sessions, batch, seq, past, pad):
    feed = decoder_feeds(CONFIG, batch, seq, past, pad, np.random.default_rng(batch * 100 + seq * 10 + past))
    want, got = run_both(*sessions, feed)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=1e-6, err_msg=name)
