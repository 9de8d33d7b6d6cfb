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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import torch
from polygraphy.comparator.struct import IterationResult

from mixexport import graph_io
from mixexport.checkpoint.config import MixtralConfig
from mixexport.checkpoint.names import weight_count
from mixexport.dtypes import dtype_info, torch_dtype
from mixexport.errors import InternalError
from mixexport.model.decoder import (DecoderLayer, RMSNorm, attention_bias_mask, parameter_sources,
                                     rotary_cos_sin)
from mixexport.passes.stages import cut_stage, layer_stages
from mixexport.quant import QuantScheme
from mixexport.validate.inventory import FileHashes, TargetGraph, external_extents
from mixexport.validate.quant_parity import quantization_error
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


class PhaseTimes:
    """Wall seconds per phase of streamed validation, summed over its stages, for its progress
    lines: where its time goes (reading the reference's weights, running it, creating and running
    the onnxruntime sessions, comparing). Exclusive: the seconds of a phase timed inside another
    count for the inner phase only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds of the phases timed inside it

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[phase] = self.seconds.get(phase, 0.0) + spent - self._inner.pop()
            if self._inner:
                self._inner[-1] += spent

    def summary(self) -> str:
        return ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.seconds.items())


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
    def run(self, steps: list[dict[str, torch.Tensor]],
            pasts: list[dict[str, torch.Tensor]] | None = None) -> list[dict[str, torch.Tensor]]:
        """The stage on every step of the scenario, each layer's past its own present of the step
        before (empty at the prefill), or the given one.

        Layer by layer: a layer's attention step by step, then its MoE for all steps at once
        (`DecoderLayer.feed_forward_batches`), so each expert's weights are upcast once per layer,
        not once per step; every step computes exactly what it would alone.

        Args:
            steps: per step, the stage's boundary inputs but the past: `input_ids` (embedding)
                or `hidden_states.{first}`, `attention_mask`, `position_ids`.
            pasts: per step, its layers' `past_key_values.*` (None: the stage's own presents).

        Returns:
            per step, the stage's outputs: the next boundary (or logits), its layers' presents
            and router logits.
        """
        c, stage = self.config, self.stage
        h = [self.embed(step["input_ids"]) if stage.embedding else step[graph_io.hidden_state_name(stage.first)]
             for step in steps]
        outputs: list[dict[str, torch.Tensor]] = [{} for _ in steps]
        if self.layers:
            rotary = [rotary_cos_sin(step["position_ids"], c.head_dim, c.rope_theta, h[0].dtype) for step in steps]
            allowed = [attention_bias_mask(step["attention_mask"], step["position_ids"].shape[1], c.sliding_window)
                       for step in steps]
            kv = (h[0].shape[0], c.num_key_value_heads, 0, c.head_dim)
            for index, layer in zip(range(stage.first, stage.end), self.layers):
                key = value = torch.zeros(kv, dtype=h[0].dtype)  # the past of the prefill: empty
                for s, (step_h, (cos, sin), mask) in enumerate(zip(h, rotary, allowed)):
                    if pasts is not None:
                        key, value = (pasts[s][name] for name in graph_io.past_names(index))
                    h[s], key, value = layer.attend(step_h, cos, sin, mask, key, value)
                    outputs[s].update(zip(graph_io.present_names(index), (key, value)))
                self.recorder.router_logits.clear()
                h = layer.feed_forward_batches(h)
                for out, router in zip(outputs, self.recorder.router_logits):
                    out[graph_io.router_logits_name(index)] = router
        for out, step_h in zip(outputs, h):
            out.update({"logits": self.lm_head(self.norm(step_h)).float()} if stage.head else
                       {graph_io.hidden_state_name(stage.end): step_h})
        return outputs


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
                     stage_model: StageModel | None = None, chained: frozenset[str] = frozenset(),
                     quant: QuantScheme | None = None, quant_thresholds: dict[str, float] | None = None,
                     hashes: FileHashes | None = None) -> dict[str, dict[str, Any]]:
    """Compare each target graph in `to_run` with the reference, stage by stage.

    Full-precision experts: every stage is fed the reference's boundary (teacher forcing across
    layers). Quantized experts (`quant`), the two checks of `quant_parity` per stage: (a) each
    target stage against the reference stage with the dequantized experts, both fed the same
    inputs, at `tolerances`; (b) the quantization error against the full-precision reference
    (router agreement per layer, top-1 and logits error at the head, gated by `quant_thresholds`).
    For (b) a target's stages form its own chain, each fed the hidden state its previous stage
    computed, and every layer's past is the full-precision reference's, as whole validation feeds
    the whole graph: the error accumulates through the layers as it does in the deployed model.

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
        quant: the experts' quantization scheme (None: full precision; not with `chained`).
        quant_thresholds: `QuantThresholds.resolve`'s gates (with `quant`).
        hashes: the artifact's pending sha256 checks: each weight file is hashed, in the background
            while the stage's reference reads and runs, up to the end of what the stage's session
            reads (`FileHashes.read_ahead`).

    Returns:
        per target: status, max_abs_diff per group, router_agreement (all layers) and per layer,
        failed_stages (names that say the layer) and failed_outputs; with `quant`, also
        `quantization` (`quant_parity.quantization_error`'s record).
    """
    from mixexport.validate.parity import _compare_target, router_agreement, session_loader
    from polygraphy.backend.onnxrt import OnnxrtRunner

    if quant is not None and chained:
        raise InternalError("streamed_compare compares chains of full-precision experts only")
    config = ckpt.config
    torch_type = torch_dtype(dtype)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    steps = _scenario(config, decode_steps=decode_steps)
    kv = (len(steps[0]["input_ids"]), config.num_key_value_heads, 0, config.head_dim)  # the prefill's empty past
    hidden: list[torch.Tensor | None] = [None] * len(steps)  # the boundary leaving the last stage (reference)
    chains = {name: list(hidden) for name, _ in to_run}  # the same, each target's own (quantized experts)
    agreements: dict[str, list[tuple[float, int]]] = {name: [] for name, _ in to_run}  # vs full precision
    quantization: dict[str, dict[str, Any]] = {}  # per target: check (b), over its chain
    results: dict[str, list[tuple[graph_io.Stage, dict]]] = {name: [] for name, _ in to_run}
    stages = stages or layer_stages(config.num_hidden_layers, layers_per_stage)
    stage_model = stage_model or _stage_model_bytes
    own = {name: [None] * len(steps) for name, _ in to_run}  # chained: each target's own boundary, per step
    phases = PhaseTimes()
    start = time.perf_counter()
    for done, stage in enumerate(stages, 1):
        with phases("stage graphs"):  # first: their weights are hashed in the background beside the reference
            models = [_stage_graph(stage_model(graph, stage, config), graph.folder, hashes) for _, graph in to_run]
        with phases("reference read"):
            part = _ReferencePart(ckpt, stage, torch_type)
        layers = range(stage.first, stage.end)
        with phases("reference run"):
            full = part.run(_stage_steps(steps, stage, hidden))
        # Each layer's past at each step: the reference's own present of the step before.
        pasts = [_empty_pasts(layers, kv, torch_type) if s == 0 else
                 {past: full[s - 1][present] for i in layers
                  for past, present in zip(graph_io.past_names(i), graph_io.present_names(i))}
                 for s in range(len(steps))]
        full_iters = _iterations(full)
        compare = []  # per target: its reference outputs, its feeds, its check (b)
        for name, _ in to_run:
            inputs = hidden if quant is None else chains[name]
            ref_iters, on_outputs = full_iters, None
            if quant is not None:
                part.recorder.quant = quant  # the exactness reference: the experts the artifact stores
                with phases("reference run"):
                    ref_iters = _iterations(part.run(_stage_steps(steps, stage, inputs), pasts))
                part.recorder.quant = None
                on_outputs = _quant_check(name, stage, full_iters, steps, chains, agreements, quantization,
                                           quant_thresholds, router_agreement, layers, config.num_experts_per_tok,
                                           torch_type)
            feeds = [_as_feed({b.name: {**step, graph_io.hidden_state_name(stage.first): h, **past}[b.name]
                               for b in stage.inputs(config, dtype)}, np_dtype)
                     for step, h, past in zip(steps, inputs, pasts)]
            compare.append((ref_iters, feeds, on_outputs, inputs))
        hidden = [out.get(graph_io.hidden_state_name(stage.end)) for out in full]
        # The stage's reference weights go before an onnxruntime session loads the stage's own:
        # the two are never held at once.
        del part, full
        for (name, graph), (ref_iters, feeds, on_outputs, inputs), model in zip(to_run, compare, models):
            def make_runner(graph=graph, model=model):
                return OnnxrtRunner(_timed(session_loader(graph, config.num_hidden_layers, model), phases),
                                    name=graph.name)
            if name in chained:
                report = _compare_chained(make_runner, stage, ref_iters, feeds, own[name], tolerances,
                                          config.num_experts_per_tok, phases)
            else:
                report = _compare_target(make_runner, REFERENCE, ref_iters, feeds, tolerances, layers,
                                         config.num_experts_per_tok, on_outputs=on_outputs, phases=phases)
            results[name].append((stage, report))
            if quant is not None and chains[name] is inputs:  # it did not run: go on from the reference's
                chains[name] = hidden
        elapsed = time.perf_counter() - start
        progress(f"streamed validation: stage {done}/{len(stages)} ({stage.name}) compared, {elapsed:.1f}s elapsed "
                 f"({phases.summary()}), about {elapsed / done * (len(stages) - done):.0f}s left")
    return {name: _summarise(per_stage, quantization.get(name)) for name, per_stage in results.items()}


def _timed(load: Callable[[], Any], phases: PhaseTimes) -> Callable[[], Any]:
    """`load` (a session loader), timed as "session create"."""
    def timed():
        with phases("session create"):
            return load()
    return timed


def _stage_graph(model: Callable[[], bytes], folder: Path, hashes: FileHashes | None) -> Callable[[], bytes]:
    """`model` (a stage's graph as validation runs it) built now, its weight files (in the
    target's `folder`) being hashed in the background up to the end of what the stage reads there
    (`FileHashes.read_ahead`): by the time its session loads them, those bytes are in the page
    cache, and the hashing ran beside the reference's work. A graph that cannot be built raises
    when its session loads, so the target fails as one onnxruntime cannot load."""
    try:
        data = model()
    except Exception as exc:  # noqa: BLE001 - re-raised where the session loads (`_compare_target`)
        error = exc  # `exc` itself is unbound once the except clause ends

        def failed() -> bytes:
            raise error
        return failed
    if hashes is not None:
        for location, end in external_extents(onnx.ModelProto.FromString(data)).items():
            hashes.read_ahead(folder / location, end)
    return lambda: data


def _stage_steps(steps, stage: graph_io.Stage, hidden) -> list[dict[str, torch.Tensor]]:
    """Per step, the scenario's tensors and the hidden state entering `stage`."""
    return [{**step, graph_io.hidden_state_name(stage.first): h} for step, h in zip(steps, hidden)]


def _empty_pasts(layers: range, kv: tuple[int, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(kv, dtype=dtype) for i in layers for name in graph_io.past_names(i)}


def _iterations(outputs: list[dict[str, torch.Tensor]]) -> list[IterationResult]:
    return [IterationResult({k: _numpy(v) for k, v in out.items()}, runner_name=REFERENCE) for out in outputs]


def _quant_check(name: str, stage: graph_io.Stage, full_iters, steps, chains, agreements, quantization, thresholds,
                 router_agreement, layers: range, top_k: int, dtype: torch.dtype):
    """Check (b) of one target's stage, as `_compare_target`'s `on_outputs` (the stage's own status
    is its exactness): keeps the target's hidden state for its next stage and its router agreement
    with the full-precision reference; at the head, the quantization-error record of the whole
    chain goes into `quantization[name]`."""

    def check(target_iters):
        next_hidden = graph_io.hidden_state_name(stage.end)
        if not stage.head:
            # numpy has no bfloat16: the reference's input in its own dtype again.
            chains[name] = [torch.from_numpy(np.asarray(out[next_hidden])).to(dtype) for out in target_iters]
        scenario = [{k: v.numpy() for k, v in step.items()} for step in steps]
        if layers:
            agreements[name].append((router_agreement(full_iters, target_iters, scenario, layers, top_k), len(layers)))
        if stage.head:
            total = sum(n for _, n in agreements[name])
            agreement = sum(a * n for a, n in agreements[name]) / total if total else None
            quantization[name] = quantization_error(full_iters, target_iters, scenario, agreement, thresholds)
    return check


def _compare_chained(make_runner, stage: graph_io.Stage, ref_iters: list[IterationResult], feeds: list[dict],
                     own: list, tolerances: dict, top_k: int, phases: PhaseTimes) -> dict[str, Any]:
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
                           on_outputs=None if stage.head else pass_on, phases=phases)


def _summarise(per_stage: list[tuple[graph_io.Stage, dict]], quantization: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """One target's report from its stages' reports (and, for quantized experts, its check (b))."""
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
    if failed_stages and not reasons:
        reasons.append(f"outside tolerance in {', '.join(failed_stages)}")
    if quantization is not None:
        result["quantization"] = quantization
        if not quantization["passed"]:
            result["status"] = "fail"
            reasons.append(f"quantization error against the full-precision reference misses "
                           f"{', '.join(quantization['failed'])}")
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result
