"""Artifacts the runtime tests run, each built once per session: the tiny preset (ort + portable)
beside transformers' model of the same weights, and a checkpoint written by transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MixtralForCausalLM

from mixexport.checkpoint import preset, write_checkpoint
from mixexport.driver.build import BuildOptions, build, reference_source
from validate.hf_model import write_hf_checkpoint

RANGES = dict(max_batch=4, max_sequence=32, max_context=64)
_built: dict[str, tuple[MixtralForCausalLM, Path]] = {}


def _build(checkpoint, preset_name, out, targets) -> Path:
    with reference_source(checkpoint, preset_name, 0, {}, lambda _: None) as (ckpt, source):
        build(ckpt, source, out, BuildOptions(targets=targets, **RANGES), lambda _: None)
    return out


def tiny_preset(tmp_path_factory) -> tuple[MixtralForCausalLM, Path]:
    """(transformers' model of `init`'s tiny checkpoint, seed 0, and the artifact of --preset tiny)."""
    if "tiny" not in _built:
        checkpoint = write_checkpoint(tmp_path_factory.mktemp("init") / "tiny", preset("tiny"), seed=0)
        out = _build(None, "tiny", tmp_path_factory.mktemp("run-tiny") / "out", ("ort", "portable"))
        _built["tiny"] = MixtralForCausalLM.from_pretrained(checkpoint).eval(), out
    return _built["tiny"]


def hf_written(tmp_path_factory) -> tuple[MixtralForCausalLM, Path]:
    """(transformers' tiny Mixtral, the ort artifact of the checkpoint its save_pretrained wrote)."""
    if "hf" not in _built:
        path = tmp_path_factory.mktemp("hf") / "checkpoint"
        model = write_hf_checkpoint(path)
        _built["hf"] = model, _build(path, None, tmp_path_factory.mktemp("run-hf") / "out", ("ort",))
    return _built["hf"]


def transformers_greedy(model: MixtralForCausalLM, prompts: list[list[int]], new_tokens: int,
                        stop_at_eos: bool = False) -> list[list[int]]:
    """transformers' greedy `generate` (prompt + new tokens per row); exactly `new_tokens` unless
    `stop_at_eos`."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=0 if stop_at_eos else new_tokens, do_sample=False,
                              pad_token_id=0).tolist()
