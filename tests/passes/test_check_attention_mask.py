"""check_attention_mask: a mask that is not [B, P+S] is refused in onnxruntime; the right one gives
bit-identical outputs to the graph without the check (portable and ort; trt shares portable's
attention and gets the same nodes)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from artifact.shared import captured_once
from mixexport.errors import InternalError
from mixexport.passes.check_attention_mask import CHECK_PREFIX, CheckAttentionMask
from mixexport.passes.fold_weight_transpose import FoldWeightTranspose
from mixexport.targets.ort.fuse_attention import FuseAttentionOrt
from mixexport.targets.ort.fuse_rms_norm import FuseRMSNormOrt
from mixexport.targets.portable.lowering import LowerMoEToPortable
from mixexport.passes.name_graph import NameGraph
from mixexport.targets import backend
from passes.ort_graphs import decoder_feeds, ort_graph, session
from passes.single_moe import moe_weights, single_moe_model


@pytest.fixture(scope="module")
def captured(tiny_checkpoint):
    model, ckpt = captured_once(tiny_checkpoint)
    return model, ckpt.config


def _portable(captured: ir.Model, *extra) -> ir.Model:
    model = captured.clone()
    for step in (NameGraph(), FoldWeightTranspose(), LowerMoEToPortable(), *extra, RemoveUnusedNodesPass()):
        step(model)
    return model


@pytest.fixture(scope="module", params=["portable", "ort"])
def sessions(request, captured, tmp_path_factory):
    """(session without the check, session with it, config) for one target's graph."""
    model, config = captured
    layers = config.num_hidden_layers
    root = tmp_path_factory.mktemp(f"mask-{request.param}")
    if request.param == "portable":
        graphs = _portable(model), _portable(model, CheckAttentionMask())
    else:
        fusions = FuseAttentionOrt(layers), FuseRMSNormOrt(layers)
        graphs = ort_graph(model, *fusions), ort_graph(model, *fusions, CheckAttentionMask())
    return session(graphs[0], root / "unchecked.onnx"), session(graphs[1], root / "checked.onnx"), config


@pytest.mark.parametrize("batch, seq, past, pad", [(2, 7, 0, 3), (2, 1, 6, 2), (1, 3, 4, 0), (3, 2, 5, 1)])
def test_right_mask_gives_identical_outputs(sessions, batch, seq, past, pad):
    unchecked, checked, config = sessions
    feed = decoder_feeds(config, batch, seq, past, pad, np.random.default_rng(0))
    want = unchecked.run(None, feed)
    got = checked.run(None, feed)
    assert len(want) == len(got) == 1 + 2 * config.num_hidden_layers
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


# (batch, seq, past) of the feed, then the wrong mask shape. The last case is what Polygraphy's CLI
# feeds by default: length 1 for every dynamic dimension, so the mask is [1, 1] with P + S = 2.
WRONG = [((2, 3, 2), (2, 1)), ((2, 3, 2), (1, 5)), ((2, 3, 2), (2, 6)), ((2, 3, 2), (2, 4)), ((2, 3, 2), (1, 1)),
         ((2, 1, 0), (1, 2)), ((1, 1, 1), (1, 1)), ((2, 3, 2), (1, 10))]


@pytest.mark.parametrize("dims, mask_shape", WRONG)
def test_wrong_mask_is_refused(sessions, dims, mask_shape):
    unchecked, checked, config = sessions
    feed = decoder_feeds(config, *dims, 0, np.random.default_rng(0))
    feed["attention_mask"] = np.ones(mask_shape, np.int64)
    with pytest.raises(Exception, match=f"Reshape node. Name:'{CHECK_PREFIX}is_batch_by_past_plus_sequence'"):
        checked.run(None, feed)


def test_unchecked_portable_broadcasts_a_short_mask(sessions):
    """Why the pass exists: without it, the portable graph runs a length-1 mask (wrong logits)."""
    unchecked, _, config = sessions
    feed = decoder_feeds(config, 2, 3, 2, 0, np.random.default_rng(0))
    feed["attention_mask"] = np.ones((1, 5), np.int64)  # batch 1 for batch 2: broadcast by both graphs
    assert unchecked.run(["logits"], feed)[0].shape == (2, 3, config.vocab_size)


@pytest.mark.parametrize("target", ["portable", "ort", "trt"])
def test_every_target_routes_the_mask_through_the_check(captured, target):
    model, config = captured
    lowered = model.clone()
    report = backend(target).lower(lowered, config.num_hidden_layers)
    assert report["check_attention_mask"] == 1
    mask = next(v for v in lowered.graph.inputs if v.name == "attention_mask")
    assert [(n.op_type, n.name) for n, _ in mask.uses()] == [
        ("Shape", f"{CHECK_PREFIX}shape"), ("Reshape", f"{CHECK_PREFIX}is_batch_by_past_plus_sequence")]
    assert sum(n.name.startswith(CHECK_PREFIX) for n in lowered.graph) == 11


def test_graph_without_a_mask_is_left_alone():
    model = single_moe_model(*moe_weights(4, 8, 6), top_k=2, normalize=True)
    before = len(list(model.graph))
    result = CheckAttentionMask()(model)
    assert (result.modified, result.rewrites, len(list(model.graph))) == (False, 0, before)


def test_mask_without_input_ids_is_an_internal_error(captured):
    model = captured[0].clone()
    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    ids.name = "tokens"
    with pytest.raises(InternalError, match="graph has attention_mask but no input_ids or past_key_values.0.key input"):
        CheckAttentionMask()(model)
