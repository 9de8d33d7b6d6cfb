"""The pass pipeline on a captured tiny decoder: per-pass counts, and failure on a wrong MoE count."""

from __future__ import annotations

import pytest

from artifact.shared import captured_once
from mixexport.errors import InternalError
from mixexport.targets import backend
from passes.single_moe import moe_weights, single_moe_model

TARGETS = ["portable", "ort", "trt"]


@pytest.fixture(scope="module")
def captured(tiny_checkpoint):
    model, ckpt = captured_once(tiny_checkpoint)
    return model, ckpt.config


@pytest.mark.parametrize("target", TARGETS)
def test_report_counts(captured, target):
    model, config = captured
    layers = config.num_hidden_layers
    lowered = model.clone()
    report = backend(target).lower(lowered, layers)
    fusions = ["fuse_attention_ort", "fuse_qkv_ort", "fuse_rms_norm_ort", "fold_ort"] if target == "ort" else []
    assert list(report) == ["name_graph", "fold_weight_transpose", f"lower_moe_{target}", *fusions,
                            "check_attention_mask", "remove_unused", "remove_unused_opsets"]
    assert report["check_attention_mask"] == 1
    assert report[f"lower_moe_{target}"] == layers
    # q, k, v, o per layer and lm_head are Linear weights exported as Transpose(W)
    assert report["fold_weight_transpose"] >= 4 * layers
    assert report["name_graph"] >= layers  # one router-logits rename per layer at least
    assert report["remove_unused_opsets"] == 1  # the `mixexport` import went away
    assert "mixexport" not in lowered.opset_imports
    assert all(n.domain != "mixexport" for n in lowered.graph)


@pytest.mark.parametrize("target", TARGETS)
def test_raises_when_rewrites_differ_from_layers(captured, target):
    model, config = captured
    layers = config.num_hidden_layers
    with pytest.raises(InternalError, match=rf"{target} lowering rewrote {layers} MoE nodes, expected one per "
                                            rf"layer \({layers + 1}\)"):
        backend(target).lower(model.clone(), layers + 1)


def test_raises_when_lowering_matches_nothing():
    model = single_moe_model(*moe_weights(4, 8, 6), top_k=2, normalize=True)
    # portable: the ort pipeline would also (rightly) stop on the missing attention
    backend("portable").lower(model, 1)
    with pytest.raises(InternalError, match=r"portable lowering rewrote 0 MoE nodes, expected one per layer \(1\)"):
        backend("portable").lower(model, 1)


def test_unlowerable_moe_node_is_an_internal_error():
    model = single_moe_model(*moe_weights(4, 8, 6), top_k=2, normalize=True)
    node = model.graph.node(0)
    model.graph.initializers["layers.0.moe.w_down"].const_value = None  # weights no longer a constant
    with pytest.raises(InternalError, match="cannot lower MoE node: .*layers.0.moe.w_down are not an initializer"):
        backend("portable").lower(model, 1)
    assert node.domain == "mixexport"
