"""Artifacts the runtime tests run, each built once per session: the tiny preset (ort + portable)
beside transformers' model of the same weights, and a checkpoint written by transformers; each
also as an ort graph with the shared KV layout (`--kv-layout shared`)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MixtralForCausalLM

from mixexport.checkpoint import preset, write_checkpoint
from mixexport.driver.build import BuildOptions, build, reference_source
from validate.hf_model import write_hf_checkpoint

RANGES = dict(max_batch=4, max_sequence=32, max_context=64)
_built: dict[str, tuple[MixtralForCausalLM, Path]] = {}


def _build(checkpoint, preset_name, out, targets, kv_layout: str = "concat") -> Path:
    with reference_source(checkpoint, preset_name, 0, {}, lambda _: None) as (ckpt, source):
        build(ckpt, source, out, BuildOptions(targets=targets, kv_layout=kv_layout, **RANGES), lambda _: None)
    return out


def tiny_preset(tmp_path_factory, kv_layout: str = "concat") -> tuple[MixtralForCausalLM, Path]:
    """(transformers' model of `init`'s tiny checkpoint, seed 0, and the artifact of --preset tiny:
    ort + portable, or with `kv_layout` shared its ort target alone)."""
    key = f"tiny-{kv_layout}"
    if key not in _built:
        checkpoint = write_checkpoint(tmp_path_factory.mktemp("init") / "tiny", preset("tiny"), seed=0)
        targets = ("ort", "portable") if kv_layout == "concat" else ("ort",)
        out = _build(None, "tiny", tmp_path_factory.mktemp(f"run-{key}") / "out", targets, kv_layout)
        _built[key] = MixtralForCausalLM.from_pretrained(checkpoint).eval(), out
    return _built[key]


def hf_written(tmp_path_factory, kv_layout: str = "concat") -> tuple[MixtralForCausalLM, Path]:
    """(transformers' tiny Mixtral, the ort artifact (KV layout `kv_layout`) of the checkpoint its
    save_pretrained wrote)."""
    key = f"hf-{kv_layout}"
    if key not in _built:
        path = tmp_path_factory.mktemp("hf") / "checkpoint"
        model = write_hf_checkpoint(path)
        _built[key] = model, _build(path, None, tmp_path_factory.mktemp(f"run-{key}") / "out", ("ort",), kv_layout)
    return _built[key]


def transformers_greedy(model: MixtralForCausalLM, prompts: list[list[int]], new_tokens: int,
                        stop_at_eos: bool = False) -> list[list[int]]:
    """transformers' greedy `generate` (prompt + new tokens per row); exactly `new_tokens` unless
    `stop_at_eos`."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=0 if stop_at_eos else new_tokens, do_sample=False,
                              pad_token_id=0).tolist()
