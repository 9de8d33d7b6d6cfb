"""`mixexport generate`: the plain onnxruntime loop's greedy tokens are transformers' (prompts
shorter and longer than one graph call), onnxruntime-genai's are the same, sampling is seeded, and
hostile input gets one `error:` line."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from artifact.shared import error_line, run_cli
from mixexport.errors import MixexportError
from mixexport.runtime.generate import KvLoop, Sampling, generate, open_session, open_target
from runtime import artifacts
from validate.hf_model import VOCAB

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
PROMPT = [5, 17, 33, 90, 7, 3]
LONG_PROMPT = [(7 * i + 3) % 250 + 3 for i in range(40)]  # longer than the built 32 tokens per call


def _tokens(out, target, prompt, n, runtime, sampling=Sampling()):
    return list(generate(open_target(out, target), prompt, n, sampling, runtime))


@pytest.mark.parametrize("target", ["ort", "portable"])
@pytest.mark.parametrize("prompt, n", [(PROMPT, 16), (PROMPT, 32), (LONG_PROMPT, 16)])
def test_plain_loop_matches_transformers(tiny_preset, target, prompt, n):
    model, out = tiny_preset
    want = artifacts.transformers_greedy(model, [prompt], n, stop_at_eos=True)[0][len(prompt):]
    assert _tokens(out, target, prompt, n, "onnxruntime") == want


def test_plain_loop_matches_transformers_on_its_own_checkpoint(hf_written):
    model, out = hf_written
    prompt = [t % VOCAB for t in PROMPT]
    want = artifacts.transformers_greedy(model, [prompt], 24, stop_at_eos=True)[0][len(prompt):]
    assert _tokens(out, "ort", prompt, 24, "onnxruntime") == want


@pytest.mark.parametrize("prompt, n", [(PROMPT, 32), (LONG_PROMPT, 16)])
def test_plain_loop_runs_the_shared_kv_layout(tiny_preset_shared, prompt, n):
    """One static buffer for the run; the long prompt is prefilled in two calls (a chunk with a past)."""
    model, out = tiny_preset_shared
    assert open_target(out, "ort").kv_layout == "shared"
    want = artifacts.transformers_greedy(model, [prompt], n, stop_at_eos=True)[0][len(prompt):]
    assert _tokens(out, "ort", prompt, n, "onnxruntime") == want


def test_the_shared_layout_loop_writes_its_buffers_in_place(tiny_preset_shared):
    """The presents come back in the very buffers bound as the past (no copy of the cache a step),
    holding the prompt's keys in its slots and nothing after them."""
    _, out = tiny_preset_shared
    generation = open_target(out, "ort")
    config = generation.config
    loop = KvLoop(open_session(generation.folder / "model.onnx"), config["num_hidden_layers"],
                  (config["num_key_value_heads"], config["head_dim"]), np.float32, "shared", 16)
    addresses = [value.data_ptr() for value in loop.buffers]
    for step, ids in enumerate((PROMPT, [9])):
        done = step * len(PROMPT)
        loop.run(np.array([ids], np.int64), np.ones((1, done + len(ids)), np.int64),
                 np.arange(done, done + len(ids))[None])
    assert [value.data_ptr() for value in loop.binding.get_outputs()[1:]] == addresses
    for value in loop.buffers:
        cache = value.numpy()[0]  # [KVH, 16, D]
        assert np.all(np.any(cache[:, :len(PROMPT) + 1] != 0, axis=-1)) and not np.any(cache[:, len(PROMPT) + 1:])


@pytest.mark.parametrize("layout", ["concat", "shared"])
def test_the_loop_decodes_a_batch_through_its_bound_step_arrays(tiny_preset, tiny_preset_shared, layout):
    """Batch 2: the prefill binds fresh arrays, every decode step then runs through the arrays
    bound once ([2, 1] ids and positions, [2, 1, V] logits); both rows' greedy tokens are
    transformers'."""
    model, out = tiny_preset if layout == "concat" else tiny_preset_shared
    generation = open_target(out, "ort")
    config = generation.config
    prompts, n = [PROMPT, [11, 4, 29, 60, 2, 8]], 12
    loop = KvLoop(open_session(generation.folder / "model.onnx"), config["num_hidden_layers"],
                  (config["num_key_value_heads"], config["head_dim"]), np.float32, layout, len(PROMPT) + n, batch=2)
    ids, done, rows = np.array(prompts, np.int64), 0, [[], []]
    for _ in range(n):
        logits = loop.run(ids, np.ones((2, done + ids.shape[1]), np.int64),
                          np.broadcast_to(np.arange(done, done + ids.shape[1]), ids.shape))
        done += ids.shape[1]
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        for row, token in zip(rows, ids[:, 0]):
            row.append(int(token))
    assert loop.step_bound
    want = artifacts.transformers_greedy(model, prompts, n)
    assert [prompt + row for prompt, row in zip(prompts, rows)] == want


@pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai is not installed (pip install 'mixexport[genai]')")
@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT])
def test_genai_and_the_plain_loop_agree(tiny_preset, prompt):
    _, out = tiny_preset
    assert _tokens(out, "ort", prompt, 20, "genai") == _tokens(out, "ort", prompt, 20, "onnxruntime")


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_preset):
    _, out = tiny_preset
    hot = Sampling(temperature=1.5, top_p=0.95, seed=7)
    first = _tokens(out, "ort", PROMPT, 16, "onnxruntime", hot)
    assert first == _tokens(out, "ort", PROMPT, 16, "onnxruntime", hot)
    assert first != _tokens(out, "ort", PROMPT, 16, "onnxruntime", Sampling(temperature=1.5, top_p=0.95, seed=8))
    assert _tokens(out, "ort", PROMPT, 16, "onnxruntime", Sampling(top_k=1, seed=3)) == \
        _tokens(out, "ort", PROMPT, 16, "onnxruntime")


@pytest.mark.parametrize("runtime", ["onnxruntime"] + (["genai"] if HAS_GENAI else []))
def test_cli_streams_ids_and_text_and_reports_the_rate(tiny_preset, runtime):
    _, out = tiny_preset
    result = run_cli("generate", out, "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "16",
                     "--runtime", runtime)
    assert result.exit_code == 0, result.output
    assert [int(t) for t in result.stdout.strip().split(",")] == _tokens(out, "ort", PROMPT, 16, "onnxruntime")
    assert f"(ort, {runtime})" in result.stderr and "tokens/s" in result.stderr
    text = run_cli("generate", out, "--prompt", "héllo wörld", "--max-new-tokens", "8", "--runtime", runtime,
                   "--target", "portable")
    assert text.exit_code == 0, text.output
    assert text.stdout.strip() and "(portable, " in text.stderr and "tokens/s" in text.stderr


def test_a_prompt_longer_than_one_call_and_the_context(tiny_preset):
    _, out = tiny_preset
    line = error_line(run_cli("generate", out, "--ids", ",".join(["3"] * 60), "--max-new-tokens", "5"))
    assert line == ("error: the prompt (60 tokens) plus --max-new-tokens 5 exceeds the artifact's context of 64 "
                    "tokens (build with a larger --max-context)")


@pytest.mark.parametrize("args, message", [
    (["--ids", "1,x,3"], "error: --ids: 'x' is not a token id (use comma-separated integers, e.g. 1,2,3)"),
    (["--ids", "1,-2"], "error: --ids: '-2' is not a token id (use comma-separated integers, e.g. 1,2,3)"),
    (["--ids", ""], "error: --ids: '' is not a token id (use comma-separated integers, e.g. 1,2,3)"),
    (["--ids", "1,256"], "error: --ids: 256 is not below the vocabulary size 256"),
    (["--ids", "1,99999999999999999999999"], "error: --ids: 99999999999999999999999 is not below the vocabulary "
                                              "size 256"),
    (["--ids", "١"], "error: --ids: '١' is not a token id (use comma-separated integers, e.g. 1,2,3)"),
    ([], "error: give either --prompt TEXT or --ids 1,2,3"),
    (["--ids", "1", "--prompt", "hi"], "error: give either --prompt TEXT or --ids 1,2,3"),
    (["--ids", "1", "--temperature", "0"], "error: --temperature 0.0 must be in (0, 100]"),
    (["--ids", "1", "--temperature", "nan"], "error: --temperature nan must be in (0, 100]"),
    (["--ids", "1", "--top-k", "0"], "error: --top-k 0 must be at least 1"),
    (["--ids", "1", "--top-p", "1.5"], "error: --top-p 1.5 must be in (0, 1]"),
])
def test_hostile_input_gets_one_line(tiny_preset, args, message):
    _, out = tiny_preset
    assert error_line(run_cli("generate", out, *args)) == message


def test_a_missing_or_foreign_out(tmp_path):
    assert error_line(run_cli("generate", tmp_path / "nope", "--ids", "1")) == \
        f"error: {tmp_path / 'nope'} is not a directory: give the OUT of a mixexport build"
    assert error_line(run_cli("generate", tmp_path, "--ids", "1")) == \
        f"error: {tmp_path / 'manifest.json'} not found: is {tmp_path} a mixexport build directory?"


def test_a_target_the_artifact_lacks_and_a_prompt_without_a_tokenizer(hf_written):
    _, out = hf_written
    assert error_line(run_cli("generate", out, "--target", "portable", "--ids", "1")) == \
        f"error: {out} has no portable target (it holds ort)"
    assert error_line(run_cli("generate", out, "--prompt", "hi")) == \
        f"error: {out / 'ort' / 'tokenizer.json'} not found: the checkpoint had no tokenizer; pass token ids with --ids"


def test_a_broken_tokenizer_is_refused(tiny_preset, tmp_path):
    _, out = tiny_preset
    copy = shutil.copytree(out, tmp_path / "out")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "ort" / "tokenizer.json").write_text("{not json")
    entry = next(f for f in manifest["targets"]["ort"]["files"] if f["path"] == "ort/tokenizer.json")
    entry["bytes"] = (copy / "ort" / "tokenizer.json").stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = error_line(run_cli("generate", copy, "--prompt", "hi"))
    assert line.startswith(f"error: {copy / 'ort' / 'tokenizer.json'}: not a tokenizer the tokenizers library reads")


def test_generate_refuses_a_trt_target_by_name(tiny_preset):
    _, out = tiny_preset
    with pytest.raises(MixexportError, match="--target 'trt': generate runs ort or portable"):
        open_target(out, "trt")
