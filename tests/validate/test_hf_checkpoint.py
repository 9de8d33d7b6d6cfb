"""A checkpoint written by transformers' own `save_pretrained`: the ort artifact matches transformers'
logits over a prefill and 4 decode steps (batch 2, left padding), and validate guards its source."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from artifact.shared import error_line, run_cli
from validate.hf_model import D, KVH, LAYERS, VOCAB, write_hf_checkpoint
from mixexport import graph_io
from mixexport.driver.build import BuildOptions, build, reference_source


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "checkpoint"
    return write_hf_checkpoint(path), path


@pytest.fixture(scope="module")
def hf_artifact(hf_model, tmp_path_factory):
    _, path = hf_model
    out = tmp_path_factory.mktemp("hf-out") / "out"
    with reference_source(path, None, 0, {}, lambda _: None) as (ckpt, source):
        manifest = build(ckpt, source, out, BuildOptions(targets=("ort",), max_batch=4, max_sequence=32,
                                                         max_context=64), lambda _: None)
    return out, manifest


def test_build_validates(hf_artifact):
    _, manifest = hf_artifact
    assert manifest.validation["passed"] and manifest.source["kind"] == "checkpoint"


def test_ort_matches_transformers_prefill_and_decode(hf_model, hf_artifact):
    model, _ = hf_model
    out, _ = hf_artifact
    session = ort.InferenceSession(str(out / "ort" / "model.onnx"), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    batch, prompt, pad = 2, 7, 3
    ids = torch.randint(0, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, prompt, dtype=torch.int64)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past = {name: np.zeros((batch, KVH, 0, D), np.float32)
            for i in range(LAYERS) for name in graph_io.past_names(i)}
    hf_cache = None
    for step in range(5):
        with torch.no_grad():
            hf = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=hf_cache,
                       use_cache=True)
        hf_cache = hf.past_key_values
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(), **past}
        results = dict(zip(output_names, session.run(None, feed)))
        real = mask[:, -ids.shape[1]:].bool().numpy()  # padding positions' logits are meaningless
        got, want = results["logits"][real], hf.logits.float().numpy()[real]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"step {step}")
        past = {graph_io.past_names(i)[j]: results[graph_io.present_names(i)[j]]
                for i in range(LAYERS) for j in range(2)}  # ORT's own present -> past
        ids = hf.logits[:, -1].argmax(-1, keepdim=True)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
    assert past["past_key_values.0.key"].shape == (batch, KVH, prompt + 4, D)


def test_validate_refuses_a_changed_checkpoint(hf_model, hf_artifact, tmp_path):
    _, path = hf_model
    out, _ = hf_artifact
    moved = shutil.copytree(path, tmp_path / "moved")
    assert run_cli("validate", out, "--checkpoint", moved).exit_code == 0  # same files elsewhere: fine
    data = bytearray((moved / "model.safetensors").read_bytes())
    data[-8:] = bytes(8)
    (moved / "model.safetensors").write_bytes(bytes(data))
    line = error_line(run_cli("validate", out, "--checkpoint", moved))
    assert line == (f"error: reference checkpoint {moved}: the weights in {moved / 'model.safetensors'} have "
                    f"changed since the build (size or tensor sha256 differ)")


def test_validate_refuses_a_gone_checkpoint(hf_artifact, tmp_path):
    out, _ = hf_artifact
    copy = shutil.copytree(out, tmp_path / "out")
    manifest = json.loads((copy / "manifest.json").read_text())
    gone = tmp_path / "deleted-checkpoint"
    manifest["source"]["path"] = str(gone)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = error_line(run_cli("validate", copy))
    assert line == (f"error: reference checkpoint {gone} (recorded at build time) is gone; pass --checkpoint DIR "
                    f"with the same files")
