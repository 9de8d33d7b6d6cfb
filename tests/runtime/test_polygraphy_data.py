"""The Polygraphy data loader: feeds whose shapes agree (mask = past + new), within the manifest's
ranges, that the graphs accept; and the stock `polygraphy run` CLI passing with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from artifact.shared import forced_unvalidated_ort_build
from mixexport import graph_io
from mixexport.artifact.manifest import read_manifest
from mixexport.errors import MixexportError
from mixexport.runtime import polygraphy_data


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
    script = Path(polygraphy_data.__file__)
    polygraphy = Path(sys.executable).with_name("polygraphy")
    run = subprocess.run([str(polygraphy), "run", str(out / "ort" / "model.onnx"), "--onnxrt",
                          "--data-loader-script", str(script)],
                         env={**os.environ, polygraphy_data.ARTIFACT_ENV: str(out)}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout + run.stderr


def test_without_the_artifact_variable_it_says_what_to_set(monkeypatch):
    monkeypatch.delenv(polygraphy_data.ARTIFACT_ENV, raising=False)
    with pytest.raises(MixexportError, match=r"set MIXEXPORT_ARTIFACT=OUT"):
        polygraphy_data.load_data()
