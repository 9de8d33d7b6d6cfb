"""What the ort fusion tests share: the ort pipeline up to a given fusion, sessions, decoder feeds.

Each fusion is tested against the same pipeline without it, run in onnxruntime on the same feeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

from mixexport.checkpoint import MixtralConfig
from mixexport.passes.fold_weight_transpose import FoldWeightTranspose
from mixexport.targets.ort.lowering import LowerMoEToOrt
from mixexport.passes.name_graph import NameGraph


def ort_graph(captured: ir.Model, *fusions: ir.passes.InPlacePass) -> ir.Model:
    """A clone of `captured` through the ort lowering and then only `fusions`, cleaned up."""
    model = captured.clone()
    for step in (NameGraph(), FoldWeightTranspose(), LowerMoEToOrt(), *fusions, RemoveUnusedNodesPass()):
        step(model)
    return model


def session(model: ir.Model, path: Path) -> ort.InferenceSession:
    ir.save(model, str(path), external_data=path.name + ".data")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def decoder_feeds(config: MixtralConfig, batch: int, seq: int, past: int, pad: int, rng) -> dict[str, np.ndarray]:
    """Row 0 is full; rows 1.. are left-padded by `pad` over past + current; the past is random."""
    total = past + seq
    mask = np.ones((batch, total), np.int64)
    mask[1:, :pad] = 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, past:]
    feed = {"input_ids": rng.integers(0, config.vocab_size, (batch, seq)), "attention_mask": mask,
            "position_ids": positions}
    shape = (batch, config.num_key_value_heads, past, config.head_dim)
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = rng.standard_normal(shape).astype(config.dtype)
    return feed


def run_both(want: ort.InferenceSession, got: ort.InferenceSession, feed: dict) -> tuple[dict, dict]:
    """Every output of both sessions by name (the same names in both)."""
    results = []
    for session_ in (want, got):
        names = [o.name for o in session_.get_outputs()]
        results.append(dict(zip(names, session_.run(None, feed))))
    assert set(results[0]) == set(results[1])
    return results[0], results[1]


def assert_fused_matches_unfused(config: MixtralConfig, sessions: tuple, batch: int, seq: int, past: int, pad: int,
                                 atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """The fused session's outputs equal the unfused one's (same dtype, shape, no NaN) on seeded decoder feeds."""
    feed = decoder_feeds(config, batch, seq, past, pad, np.random.default_rng(batch * 100 + seq * 10 + past))
    want, got = run_both(*sessions, feed)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert not np.isnan(got[name]).any(), name
        np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=atol, rtol=rtol,
                                   err_msg=name)
