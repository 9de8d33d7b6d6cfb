"""Layer-streamed parity: the reference and each target compared one stage at a time.

Whole-model validation holds the PyTorch reference and an onnxruntime session of the whole graph
(about 190 GB for Mixtral 8x7B in fp16). Streamed validation holds one stage: the reference runs
the embedding, then each decoder layer, then the head, with only that part's weights read from
the checkpoint; each target's graph is cut at the same boundaries (`passes.stages`) and each stage
runs in onnxruntime with only its own weights loaded from the artifact's external data. Every
stage is fed the reference's boundary tensors (teacher forcing across layers as well as steps)
and compared with Polygraphy as whole validation compares the graph: hidden states, present
keys/values and router logits per stage, router agreement per layer.

The scenario is whole validation's (batch 2, left padding, a prefill and decode steps), except
that the decode steps' tokens are drawn from the seeded generator instead of the reference's
greedy choice: a greedy token needs every layer's output before the next step's first layer,
which would read the checkpoint once per step instead of once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import torch
from polygraphy.comparator.struct import IterationResult

from mixexport import graph_io
from mixexport.checkpoint.config import MixtralConfig
from mixexport.checkpoint.names import weight_count
from mixexport.dtypes import dtype_info, torch_dtype
from mixexport.model.decoder import (DecoderLayer, RMSNorm, attention_bias_mask, parameter_sources,
                                     rotary_cos_sin)
from mixexport.passes.stages import cut_stage, layer_stages
from mixexport.validate.inventory import TargetGraph
from mixexport.validate.reference_runner import RecordingMoE, _numpy

Progress = Callable[[str], None]
StageModel = Callable[[TargetGraph, graph_io.Stage, MixtralConfig], Callable[[], bytes]]
REFERENCE = "reference"


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def whole_validation_bytes(config: MixtralConfig, dtype: str) -> int:
    """About what whole-model validation holds: the reference and one onnxruntime session (which on
    CPU keeps float32 copies of float16 weights for most ops)."""
    return held_while_comparing(weight_count(config) * torch_dtype(dtype).itemsize, dtype)


def held_while_comparing(weight_bytes: int, dtype: str) -> int:
    """About what comparing a graph (or a stage) of `weight_bytes` of weights holds: its reference
    part and its onnxruntime session (with float32 copies of float16 weights)."""
    return weight_bytes * (2 + (dtype != "float32")) + 512 * 1024**2


def choose_mode(requested: str, config: MixtralConfig, dtype: str, progress: Progress) -> str:
    """"whole" or "streamed": `requested` unless "auto", which streams when whole validation would
    not fit in the memory available now. Says which and why.

    Args:
        requested: "auto", "whole" or "streamed" (`--validation-mode`).
        config, dtype: the model validated.
        progress: where the choice is said.

    Returns:
        the mode validation runs in.
    """
    need = whole_validation_bytes(config, dtype)
    available = memory_available()
    fits = available is None or need <= available
    mode = requested if requested != "auto" else ("whole" if fits else "streamed")
    have = f"{need / 1e9:.1f} GB" + (f", {available / 1e9:.1f} GB available" if available is not None else "")
    why = "forced" if requested != "auto" else ("it fits" if fits else "the whole model does not fit")
    progress(f"validation mode: {mode} ({why}; whole-model validation would hold about {have})")
    return mode


def _scenario(config: MixtralConfig, batch: int = 2, prompt: int = 7, pad: int = 3, decode_steps: int = 4,
              seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per step: input_ids, attention_mask, position_ids, as whole validation's scenario builds them
    (row 0 full, the others left-padded), decode tokens from the generator."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=generator)
    mask = torch.ones(batch, prompt, dtype=torch.int64)
    mask[1:, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = []
    for _ in range(decode_steps + 1):
        steps.append({"input_ids": ids, "attention_mask": mask, "position_ids": positions})
        ids = torch.randint(0, config.vocab_size, (batch, 1), generator=generator)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
    return steps


def _load_part(module: torch.nn.Module, ckpt, prefix: str, dtype: torch.dtype) -> torch.nn.Module:
    """Give a meta-device `module` the checkpoint's weights of the parameters named `prefix*`."""
    sources = parameter_sources(ckpt.config)
    state = {name[len(prefix):]: source(ckpt, dtype) for name, source in sources.items() if name.startswith(prefix)}
    module.load_state_dict(state, assign=True, strict=True)
    return module.eval()


class _ReferencePart:
    """The reference computation of one stage, its weights read from the checkpoint."""

    def __init__(self, ckpt, stage: graph_io.Stage, dtype: torch.dtype) -> None:
        config = ckpt.config
        self.config, self.stage, self.dtype = config, stage, dtype
        self.recorder = RecordingMoE()
        with torch.device("meta"):
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size) if stage.embedding else None
            self.layers = [DecoderLayer(config, self.recorder) for _ in range(stage.first, stage.end)]
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if stage.head else None
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False) if stage.head else None
        if self.embed is not None:
            _load_part(self.embed, ckpt, "embed_tokens.", dtype)
        for index, layer in zip(range(stage.first, stage.end), self.layers):
            _load_part(layer, ckpt, f"layers.{index}.", dtype)
        if stage.head:
            _load_part(self.norm, ckpt, "norm.", dtype)
            _load_part(self.lm_head, ckpt, "lm_head.", dtype)

    @torch.no_grad()
    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c, stage = self.config, self.stage
        h = self.embed(feed["input_ids"]) if stage.embedding else feed[graph_io.hidden_state_name(stage.first)]
        outputs = {}
        if self.layers:
            positions, mask = feed["position_ids"], feed["attention_mask"]
            cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta, h.dtype)
            allowed = attention_bias_mask(mask, positions.shape[1], c.sliding_window)
            self.recorder.router_logits.clear()
            for index, layer in zip(range(stage.first, stage.end), self.layers):
                k_name, v_name = graph_io.past_names(index)
                h, key, value = layer(h, cos, sin, allowed, feed[k_name], feed[v_name])
                outputs.update(zip(graph_io.present_names(index), (key, value)))
        first = {"logits": self.lm_head(self.norm(h)).float()} if stage.head else {
            graph_io.hidden_state_name(stage.end): h}
        routers = {graph_io.router_logits_name(i): r for i, r in zip(range(stage.first, stage.end),
                                                                       self.recorder.router_logits)}
        return {**first, **outputs, **routers}


def _stage_model_bytes(graph: TargetGraph, stage: graph_io.Stage, config: MixtralConfig) -> Callable[[], bytes]:
    """The stage of `graph` as validation runs it; its initializers stay references into the
    target's external data, so onnxruntime loads only this stage's weights."""
    from mixexport.targets import backend

    def build() -> bytes:
        whole = ir.serde.deserialize_model(graph.model)
        model = ir.serde.serialize_model(cut_stage(whole, stage, config, graph.dtype, router_logits=True))
        backend(graph.name).prepare_validation_model(model, dtype_info(graph.dtype).onnx)
        return model.SerializeToString()
    return build


def _as_feed(tensors: dict[str, torch.Tensor], np_dtype) -> dict[str, np.ndarray]:
    return {name: t.numpy() if t.dtype == torch.int64 else t.float().numpy().astype(np_dtype)
            for name, t in tensors.items()}


def streamed_compare(to_run: list[tuple[str, TargetGraph]], ckpt, dtype: str, tolerances: dict, decode_steps: int,
                     progress: Progress, layers_per_stage: int = 1, stages: list[graph_io.Stage] | None = None,
                     stage_model: StageModel | None = None, chained: frozenset[str] = frozenset()
                     ) -> dict[str, dict[str, Any]]:
    """Compare each target graph in `to_run` with the reference, stage by stage.

    Args:
        to_run: (name, target graph) of every comparison: a target's name, or for a chain
            (`chained`) another name of the same target's graph.
        ckpt: the reference's checkpoint.
        dtype: the graphs' dtype.
        tolerances: (atol, rtol) per output group (parity.TOLERANCES[dtype]).
        decode_steps: decode steps after the prefill.
        progress: one line per stage (done / total, elapsed, time left).
        layers_per_stage: decoder layers per compared stage.
        stages: the stages compared instead (a staged artifact's chain, `validate.staged`).
        stage_model: (target graph, stage, config) -> a callable that gives the stage's graph as
            validation runs it; default: the stage cut from the target's whole graph.
        chained: the names in `to_run` whose stages are fed what their own previous stage output
            (`_compare_chained`) instead of the reference's boundary: the stages run as one chain
            from input_ids to logits, and only what the chain outputs is compared. Both kinds share
            one pass over the checkpoint.

    Returns:
        per target: status, max_abs_diff per group, router_agreement (all layers) and per layer,
        failed_stages (names that say the layer) and failed_outputs.
    """
    from mixexport.validate.parity import _compare_target
    from polygraphy.backend.onnxrt import OnnxrtRunner

    config = ckpt.config
    torch_type = torch_dtype(dtype)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    steps = _scenario(config, decode_steps=decode_steps)
    kv = (len(steps[0]["input_ids"]), config.num_key_value_heads, 0, config.head_dim)
    presents = {name: torch.zeros(kv, dtype=torch_type) for i in range(config.num_hidden_layers)
                for name in graph_io.present_names(i)}  # the "present" before the prefill: empty
    hidden: list[torch.Tensor | None] = [None] * len(steps)  # the boundary leaving the last stage
    results: dict[str, list[tuple[graph_io.Stage, dict]]] = {name: [] for name, _ in to_run}
    stages = stages or layer_stages(config.num_hidden_layers, layers_per_stage)
    stage_model = stage_model or _stage_model_bytes
    own = {name: [None] * len(steps) for name, _ in to_run}  # chained: each target's own boundary, per step
    start = time.perf_counter()
    for done, stage in enumerate(stages, 1):
        part = _ReferencePart(ckpt, stage, torch_type)
        layers = range(stage.first, stage.end)
        ref_iters, feeds = [], []
        for s, step in enumerate(steps):
            # The stage's boundary, every tensor from the reference: the previous stage's hidden
            # state at this step, each layer's own present of the previous step as its past.
            known = {**step, graph_io.hidden_state_name(stage.first): hidden[s]}
            for i in layers:
                known.update(zip(graph_io.past_names(i), (presents[p] for p in graph_io.present_names(i))))
            feed = {b.name: known[b.name] for b in stage.inputs(config, dtype)}
            out = part(feed)
            presents.update({name: out[name] for i in layers for name in graph_io.present_names(i)})
            hidden[s] = out.get(graph_io.hidden_state_name(stage.end))
            feeds.append(_as_feed(feed, np_dtype))
            ref_iters.append(IterationResult({k: _numpy(v) for k, v in out.items()}, runner_name=REFERENCE))
        del part  # its weights: the next stage's are read only now
        for name, graph in to_run:
            def make_runner(graph=graph, stage=stage):
                from mixexport.validate.parity import session_loader
                return OnnxrtRunner(session_loader(graph, config.num_hidden_layers,
                                                   stage_model(graph, stage, config)), name=graph.name)
            if name in chained:
                report = _compare_chained(make_runner, stage, ref_iters, feeds, own[name], tolerances,
                                          config.num_experts_per_tok)
            else:
                report = _compare_target(make_runner, REFERENCE, ref_iters, feeds, tolerances, layers,
                                         config.num_experts_per_tok)
            results[name].append((stage, report))
        elapsed = time.perf_counter() - start
        progress(f"streamed validation: stage {done}/{len(stages)} ({stage.name}) compared, {elapsed:.1f}s elapsed, "
                 f"about {elapsed / done * (len(stages) - done):.0f}s left")
    return {name: _summarise(per_stage) for name, per_stage in results.items()}


def _compare_chained(make_runner, stage: graph_io.Stage, ref_iters: list[IterationResult], feeds: list[dict],
                     own: list, tolerances: dict, top_k: int) -> dict[str, Any]:
    """One stage of a target's chain: fed, at each step, the boundary the target's own previous
    stage output (`own`, which this stage's output then replaces), and the reference's past (as
    whole-model validation feeds it); compared on its present, router logits and logits, not on
    the boundary it passes on.

    A stage whose previous stage produced nothing (it could not run) fails unrun.
    """
    from mixexport.validate.parity import _compare_target

    entering, leaving = graph_io.hidden_state_name(stage.first), graph_io.hidden_state_name(stage.end)
    if not stage.embedding:
        if any(h is None for h in own):
            return {"status": "fail", "reason": "not run: the chain's previous stage produced no output"}
        feeds = [{**feed, entering: hidden} for feed, hidden in zip(feeds, own)]
    compared = [IterationResult({k: v for k, v in it.items() if k != leaving}, runner_name=REFERENCE)
                for it in ref_iters]
    own[:] = [None] * len(own)

    def pass_on(target_iters) -> None:
        own[:] = [it[leaving] if leaving in it else None for it in target_iters]
    return _compare_target(make_runner, REFERENCE, compared, feeds, tolerances, range(stage.first, stage.end), top_k,
                           on_outputs=None if stage.head else pass_on)


def _summarise(per_stage: list[tuple[graph_io.Stage, dict]]) -> dict[str, Any]:
    """One target's report from its stages' reports."""
    max_abs: dict[str, float | None] = {}
    failed_stages, failed_outputs, reasons, per_layer = [], [], [], {}
    for stage, report in per_stage:
        if report["status"] != "pass":
            failed_stages.append(stage.name)
            failed_outputs += report.get("failed_outputs", [])
            if "reason" in report:
                reasons.append(f"{stage.name}: {report['reason']}")
        for group, diff in report.get("max_abs_diff", {}).items():
            known = max_abs.get(group, 0.0)
            max_abs[group] = None if diff is None or known is None else max(known, diff)
        if report.get("router_agreement") is not None:
            per_layer[stage.name] = report["router_agreement"]
    result = {"status": "fail" if failed_stages else "pass", "max_abs_diff": max_abs,
              "router_agreement": min(per_layer.values()) if per_layer else None,
              "router_agreement_per_stage": per_layer, "failed_stages": failed_stages,
              "failed_outputs": sorted(failed_outputs)}
    if reasons:
        result["reason"] = "; ".join(reasons)
    elif failed_stages:
        result["reason"] = f"outside tolerance in {', '.join(failed_stages)}"
    return result
