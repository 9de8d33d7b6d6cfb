"""The Polygraphy data loader: feeds whose shapes agree (mask = past + new), within the manifest's
ranges, that the graphs accept (concat and shared KV layouts, stage graphs); and the stock
`polygraphy run` CLI passing with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest

from artifact.shared import RANGES, SEED, forced_unvalidated_ort_build
from mixexport import graph_io
from mixexport.artifact.manifest import read_manifest
from mixexport.driver.build import BuildOptions, build, reference_source
from mixexport.errors import MixexportError
from mixexport.runtime import polygraphy_data
from runtime.artifacts import tiny_preset

_staged: dict[str, object] = {}


def staged_ort_build(tmp_path_factory):
    """tiny (2 layers, fp32), ort only, `--stages 2`, not validated."""
    if "out" not in _staged:
        out = tmp_path_factory.mktemp("staged") / "out"
        with reference_source(None, "tiny", SEED, {}, lambda _: None) as (ckpt, source):
            build(ckpt, source, out, BuildOptions(targets=("ort",), stages=2, validate=False, **RANGES), lambda _: None)
        _staged["out"] = out
    return _staged["out"]


def run_steps(out, graph: str, steps) -> list[dict]:
    """Each step's outputs from onnxruntime on OUT/graph."""
    session = ort.InferenceSession(str(out / graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in steps]


def polygraphy_run(out, graph: str, env_graph: str | None = None):
    script = Path(polygraphy_data.__file__)
    polygraphy = Path(sys.executable).with_name("polygraphy")
    env = {**os.environ, polygraphy_data.ARTIFACT_ENV: str(out)}
    env.pop(polygraphy_data.GRAPH_ENV, None)
    if env_graph is not None:
        env[polygraphy_data.GRAPH_ENV] = env_graph
    return subprocess.run([str(polygraphy), "run", str(out / graph), "--onnxrt", "--data-loader-script", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_feeds_agree_with_each_other_and_the_ranges(tmp_path_factory):
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    manifest = read_manifest(out)
    steps = list(polygraphy_data.feeds(manifest, batch=3, prompt=5, decode_steps=2))
    assert [f["input_ids"].shape for f in steps] == [(3, 5), (3, 1), (3, 1)]
    for past, feed in zip([0, 5, 6], steps):
        assert feed["attention_mask"].shape == (3, past + feed["input_ids"].shape[1])
        assert feed["position_ids"][0, 0] == past
        assert feed[graph_io.past_names(1)[1]].shape == (3, manifest.model["num_key_value_heads"], past,
                                                         manifest.model["head_dim"])
    session = ort.InferenceSession(str(out / "ort" / "model.onnx"), providers=["CPUExecutionProvider"])
    for feed in steps:  # the graph's mask check accepts every step
        logits = session.run(["logits"], feed)[0]
        assert logits.shape[:2] == feed["input_ids"].shape and np.isfinite(logits).all()


def test_feeds_are_clamped_to_the_manifest(tmp_path_factory):
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    manifest = read_manifest(out)
    dims = manifest.dynamic_dims
    steps = list(polygraphy_data.feeds(manifest, batch=10**6, prompt=10**6, decode_steps=10**6))
    assert steps[0]["input_ids"].shape[0] == dims["batch"][1]
    assert steps[-1]["attention_mask"].shape[1] <= dims["total_sequence"][1]
    assert steps[0]["input_ids"].shape[1] <= dims["sequence"][1]


def test_stock_polygraphy_cli_runs_the_artifact_with_it(tmp_path_factory):
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    run = polygraphy_run(out, "ort/model.onnx")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout + run.stderr


def test_shared_layout_feeds_one_buffer_for_the_whole_run(tmp_path_factory):
    _, out = tiny_preset(tmp_path_factory, "shared")
    manifest = read_manifest(out)
    steps = list(polygraphy_data.feeds(manifest, batch=2, prompt=5, decode_steps=3))
    buffer = (2, manifest.model["num_key_value_heads"], 8, manifest.model["head_dim"])
    for past, feed in zip([0, 5, 6, 7], steps):
        assert feed["attention_mask"].shape == (2, past + feed["input_ids"].shape[1])
        assert all(feed[name].shape == buffer for name in graph_io.past_names(0))
    for outputs in run_steps(out, "ort/model.onnx", steps):  # GroupQueryAttention accepts every step
        assert np.isfinite(outputs["logits"]).all() and outputs[graph_io.present_names(0)[0]].shape == buffer
    run = polygraphy_run(out, "ort/model.onnx")
    assert run.returncode == 0 and "PASSED" in run.stdout + run.stderr, run.stdout[-2000:] + run.stderr[-2000:]


def test_stage_graphs_get_their_own_boundary(tmp_path_factory):
    out = staged_ort_build(tmp_path_factory)
    manifest = read_manifest(out)
    stages = manifest.targets["ort"].stages
    first, last = (polygraphy_data.feeds(manifest, stage["onnx"], prompt=4, decode_steps=1) for stage in stages)
    hidden = graph_io.hidden_state_name(stages[1]["layers"][0])
    for feed in first:
        assert "input_ids" in feed and hidden not in feed
    last = list(last)
    assert [f[hidden].shape for f in last] == [(1, 4, manifest.model["hidden_size"]), (1, 1, manifest.model["hidden_size"])]
    for outputs in run_steps(out, stages[1]["onnx"], last):
        assert np.isfinite(outputs["logits"]).all()
    run = polygraphy_run(out, stages[1]["onnx"], env_graph=stages[1]["onnx"])
    assert run.returncode == 0 and "PASSED" in run.stdout + run.stderr, run.stdout[-2000:] + run.stderr[-2000:]


def test_a_graph_that_is_not_the_artifacts_or_ambiguous_graphs_are_refused(tmp_path_factory):
    out, _ = forced_unvalidated_ort_build(tmp_path_factory)
    manifest = read_manifest(out)
    with pytest.raises(MixexportError, match=r"MIXEXPORT_GRAPH=ort/other.onnx is not a graph of this artifact "
                                             r"\(one of: ort/model.onnx\)"):
        next(polygraphy_data.feeds(manifest, "ort/other.onnx"))
    ort_entry = manifest.targets["ort"]
    other = dataclasses.replace(ort_entry, onnx="portable/model.onnx", inputs=ort_entry.inputs[:3])
    mixed = dataclasses.replace(manifest, targets={"ort": ort_entry, "portable": other})
    with pytest.raises(MixexportError, match=r"take different inputs: set MIXEXPORT_GRAPH .*ort/model.onnx, "
                                             r"portable/model.onnx"):
        next(polygraphy_data.feeds(mixed))
    assert len(next(polygraphy_data.feeds(mixed, "portable/model.onnx"))) == 3
    unknown = dataclasses.replace(ort_entry, inputs=[*ort_entry.inputs, {"name": "extra", "dtype": "int64",
                                                                          "shape": ["batch"]}])
    with pytest.raises(MixexportError, match=r"the graph input 'extra' is not one .* knows how to feed"):
        next(polygraphy_data.feeds(dataclasses.replace(manifest, targets={"ort": unknown})))


def test_without_the_artifact_variable_it_says_what_to_set(monkeypatch):
    monkeypatch.delenv(polygraphy_data.ARTIFACT_ENV, raising=False)
    with pytest.raises(MixexportError, match=r"set MIXEXPORT_ARTIFACT=OUT"):
        polygraphy_data.load_data()
