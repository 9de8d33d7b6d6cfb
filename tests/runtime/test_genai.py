"""onnxruntime-genai runs the ort and portable targets from the files the build writes beside them,
and its greedy tokens are transformers' `generate` tokens: for the tiny preset (via `init`'s
checkpoint of the same seed) and for a checkpoint written by transformers itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixexport import graph_io
from mixexport.artifact.manifest import read_manifest, sha256_file
from runtime import artifacts
from validate.hf_model import VOCAB

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                                                     "'mixexport[genai]')")

RUNTIME_FILES = ["genai_config.json", "config.json", "generation_config.json"]


def genai_greedy(folder, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompts[0]) + new_tokens, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompts, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)] for i in range(len(prompts))]


# Equal-length prompts: genai 0.18 treats only trailing pads as padding, so a left-padded batch
# would not mean what transformers' does.
PROMPTS = {1: [[5, 17, 33, 90, 7, 3]], 2: [[5, 17, 33, 90, 7, 3], [60, 2, 41, 41, 8, 19]]}


@pytest.mark.parametrize("target", ["ort", "portable"])
@pytest.mark.parametrize("new_tokens", [16, 32])
@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_preset_tokens_match_transformers(tiny_preset, target, new_tokens, batch):
    model, out = tiny_preset
    got = genai_greedy(out / target, PROMPTS[batch], new_tokens)
    assert got == artifacts.transformers_greedy(model, PROMPTS[batch], new_tokens)
    assert all(len(row) == len(PROMPTS[batch][0]) + new_tokens for row in got)


@pytest.mark.parametrize("new_tokens", [16, 32])
@pytest.mark.parametrize("batch", [1, 2])
def test_transformers_checkpoint_tokens_match(hf_written, new_tokens, batch):
    model, out = hf_written
    prompts = [[t % VOCAB for t in row] for row in PROMPTS[batch]]
    assert genai_greedy(out / "ort", prompts, new_tokens) == artifacts.transformers_greedy(model, prompts, new_tokens)


@pytest.mark.parametrize("new_tokens", [16, 32])
@pytest.mark.parametrize("batch", [1, 2])
def test_shared_kv_layout_tokens_match_transformers(tiny_preset_shared, hf_written_shared, new_tokens, batch):
    """genai with past_present_share_buffer true (static buffers updated in place by the graph)."""
    for (model, out), vocab in ((tiny_preset_shared, 256), (hf_written_shared, VOCAB)):
        genai = json.loads((out / "ort" / "genai_config.json").read_text())
        assert genai["search"]["past_present_share_buffer"] is True
        prompts = [[t % vocab for t in row] for row in PROMPTS[batch]]
        assert genai_greedy(out / "ort", prompts, new_tokens) == artifacts.transformers_greedy(model, prompts,
                                                                                               new_tokens)


def test_runtime_files_are_in_the_manifest_and_say_what_genai_needs(tiny_preset):
    _, out = tiny_preset
    manifest = read_manifest(out)
    for target in ("ort", "portable"):
        listed = {f["path"]: f for f in manifest.targets[target].files}
        for name in RUNTIME_FILES + ["tokenizer.json", "tokenizer_config.json"]:
            entry = listed[f"{target}/{name}"]
            assert entry["sha256"] == sha256_file(out / target / name)
    genai = json.loads((out / "ort" / "genai_config.json").read_text())
    assert genai["model"]["type"] == "mistral" and genai["search"]["past_present_share_buffer"] is False
    assert genai["model"]["context_length"] == manifest.dynamic_dims[graph_io.TOTAL][1]
    decoder = genai["model"]["decoder"]
    assert decoder["inputs"]["past_key_names"] % 3 == graph_io.past_names(3)[0]
    assert decoder["outputs"]["present_value_names"] % 3 == graph_io.present_names(3)[1]
    optimum = json.loads((out / "ort" / "config.json").read_text())
    assert optimum["model_type"] == "mistral" and optimum["num_key_value_heads"] == 2
    assert (optimum["bos_token_id"], optimum["eos_token_id"]) == (1, 2)


def test_genai_tokenizer_loads_from_the_artifact(tiny_preset):
    _, out = tiny_preset
    tokenizer = og.Tokenizer(og.Model(str(out / "ort")))
    ids = tokenizer.encode("héllo world 🤖")
    assert max(ids) < 256 and 0 not in ids  # every byte known, no <unk>
    assert tokenizer.decode(ids).strip() == "héllo world 🤖"


def test_a_checkpoint_without_a_tokenizer_gets_only_the_configs(hf_written):
    _, out = hf_written
    names = sorted(p.name for p in (out / "ort").iterdir())
    assert names == sorted(RUNTIME_FILES + ["model.onnx", "model.onnx.data"])
