"""Parity of every artifact against the PyTorch reference, with Polygraphy's Comparator.

Scenario: batch 2 with left padding, a prefill, then decode steps that feed present -> past.
Every step's inputs come from the reference (teacher forcing: the reference's own cache and
greedy token), so each target is compared on identical inputs at every step and an error is
reported where it happens instead of compounding. Besides tensor tolerances, the report gives
router-decision agreement: the share of (token, layer) whose top-k expert set matches the
reference's, since a near-tie flipped by tiny drift changes a token's output a lot.

The reference is always built from the checkpoint the manifest names (or the preset + seed that
regenerates it), never from the artifact's own weights, which would hide export bugs.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from mixexport import graph_io
from mixexport.artifact.manifest import (MANIFEST, Manifest, check_manifest, read_manifest, verify_checkpoint,
                                         write_json_atomic)
from mixexport.checkpoint.config import MixtralConfig
from mixexport.checkpoint.names import weight_count
from mixexport.checkpoint.reader import Checkpoint
from mixexport.checkpoint.writer import write_checkpoint
from mixexport.dtypes import dtype_info, torch_dtype
from mixexport.errors import InternalError, MixexportError
from mixexport.model.decoder import load_reference
from mixexport.model.moe import route
from mixexport.graph_io import router_logits_name
from mixexport.targets import backend
from mixexport.targets.ort import moe_library
from mixexport.targets.ort.moe_library import check_library
from mixexport.targets.trt.engine import gpu_name, require_tensorrt
from mixexport.targets.trt.manifest_fields import ENGINE_TARGET
from mixexport.targets.trt.runner import engine_runner
from mixexport.validate.inventory import REPORT_FILE, FileHashes, TargetGraph, artifact_targets, graph_tensors
from mixexport.validate.quant_parity import QuantThresholds, quantization_error, scheme_of
from mixexport.validate.reference_runner import RecordingMoE, TorchReferenceRunner
from mixexport.validate.staged import compare_stages, with_stages
from mixexport.validate.shared_kv import SharedBufferRunner, graph_kv_layout, zero_padding
from mixexport.validate.streamed import choose_mode, streamed_compare

Progress = Callable[[str], None]
NOT_VALIDATED = "not validated"

# (atol, rtol) per output group and dtype. fp32 targets must match to round-off; fp16/bf16 targets
# differ from the reference (same dtype) by accumulation order, amplified through the layers.
TOLERANCES = {
    "float32": {"logits": (1e-4, 1e-3), "present": (1e-4, 1e-3), "router_logits": (1e-4, 1e-3),
                 "hidden_states": (1e-4, 1e-3)},
    "float16": {"logits": (2e-2, 2e-2), "present": (2e-2, 2e-2), "router_logits": (2e-2, 2e-2),
                 "hidden_states": (2e-2, 2e-2)},
    "bfloat16": {"logits": (1e-1, 5e-2), "present": (1e-1, 5e-2), "router_logits": (1e-1, 5e-2),
                 "hidden_states": (1e-1, 5e-2)},
}
# Below this share of matching (token, layer) top-k sets a target fails even within tolerance.
MIN_ROUTER_AGREEMENT = 0.98


def output_group(name: str) -> str:
    if name.startswith("present."):
        return "present"
    if name.startswith("hidden_states."):  # a stage boundary (streamed validation)
        return "hidden_states"
    if name.endswith("router_logits"):
        return "router_logits"
    return name


def scenario_feeds(model, dtype: str, batch: int = 2, prompt: int = 7, pad: int = 3, decode_steps: int = 4,
                   seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feed dicts for a prefill and `decode_steps` greedy steps, every step's past from the reference.

    Row 0 is a full prompt, the other rows are left-padded by `pad` tokens.
    """
    config: MixtralConfig = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=generator)
    mask = torch.ones(batch, prompt, dtype=torch.int64)
    mask[1:, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # numpy has no bfloat16 onnxruntime takes: bf16 caches are fed as float32 (exactly representable).
    np_dtype = np.float16 if dtype == "float16" else np.float32
    past = model.empty_cache(batch)
    feeds = []
    for _ in range(decode_steps + 1):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
        for i, (key, value) in enumerate(past):
            k_name, v_name = graph_io.past_names(i)
            feed[k_name], feed[v_name] = key.float().numpy().astype(np_dtype), value.float().numpy().astype(np_dtype)
        feeds.append(feed)
        with torch.no_grad():
            logits, past = model(ids, mask, positions, past)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
    return feeds


def validation_graph(graph: TargetGraph, num_layers: int) -> bytes:
    """The target's graph, in memory, also returning router logits, as its backend adapts it for
    onnxruntime's CPU provider (trt: the plugin node through the CPU stand-in). Nothing is
    written: the session reads the weights from the target's own folder (`session_loader`), so a
    read-only artifact validates too."""
    return adapted_for_validation(graph.model, graph.name, graph.dtype, range(num_layers))


def adapted_for_validation(graph: onnx.ModelProto, target: str, dtype: str, layers: range,
                           locations: Callable[[str], str] = lambda location: location) -> bytes:
    """A copy of `target`'s graph (or of one of its stage graphs) that also returns the router
    logits of `layers`, as its backend adapts it for onnxruntime's CPU provider.

    Args:
        locations: an external tensor's location -> where the session finds it, relative to the
            target's folder (a stage graph's data is in its stage's folder).
    """
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    elem = dtype_info(dtype).onnx
    for i in layers:
        model.graph.output.append(onnx.helper.make_tensor_value_info(router_logits_name(i), elem, None))
    for tensor in graph_tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = locations(entry.value)
    backend(target).prepare_validation_model(model, elem)
    return model.SerializeToString()


def session_loader(graph: TargetGraph, num_layers: int, model_bytes: Callable[[], bytes] | None = None):
    """A Polygraphy loader of an onnxruntime CPU session over `validation_graph` (or over
    `model_bytes()`, a graph of the same target folder: a stage of it).

    The model is given as bytes, so onnxruntime resolves its external data against
    `session.model_external_initializers_file_folder_path`: the target's folder in OUT.
    """
    def load():
        import onnxruntime as ort

        # onnxruntime's default options, float16 too. Measured on one 8x7B-shaped layer stage of the
        # ort CPU form (fp16, 2.9 GB of weights, prefill + 4 decode steps): the session maps its
        # external data (0.55 GiB resident once created, no float32 copies: the Casts onnxruntime
        # inserts before the experts' MatMuls sit in the If branches and run per chosen expert),
        # peak 4.65 GiB (2.47 file-backed weights + the CPU arena keeping the run-time casts).
        # disabled_optimizers=["ConstantFolding"] changed nothing; enable_cpu_mem_arena=False
        # peaked at 3.49 GiB but took 5-6 s more system time (3.8M page faults instead of 0.5M),
        # and the default is already under streamed validation's 6 GiB target.
        options = ort.SessionOptions()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.folder))
        backend(graph.name).configure_session(options, graph.library)
        model = model_bytes() if model_bytes else validation_graph(graph, num_layers)
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return load


def _serving_refusal(graph: TargetGraph, config: MixtralConfig) -> dict[str, str] | None:
    """A graph its own target cannot serve fails unrun: the CPU stand-in of the trt plugin would
    run a float32 graph, which no TensorRT engine could (an artifact an older mixexport wrote)."""
    reason = backend(graph.name).refusal(config, graph.dtype)
    if reason is None:
        return None
    return {"status": "fail", "reason": f"{reason}: no {graph.name} runtime can run this graph"}


def engine_not_run_status(graph: TargetGraph, config: MixtralConfig) -> dict[str, str] | None:
    """Why the trt target's engine cannot be compared here, or must fail unrun; None: run it."""
    refusal = _serving_refusal(graph, config)
    if refusal:
        return refusal
    try:
        require_tensorrt()
    except MixexportError as exc:
        return {"status": NOT_VALIDATED, "reason": str(exc)}
    return None if gpu_name() else {"status": NOT_VALIDATED, "reason": "no NVIDIA GPU visible to CUDA"}


def needs_library(graph: TargetGraph) -> bool:
    """Whether the graph (or a stage of it) runs the ort target's CPU MoE op library's op."""
    return any(moe_library.uses_library(m) for m in (graph.model, *(s.model for s in graph.stages)))


def not_run_status(graph: TargetGraph, config: MixtralConfig) -> dict[str, str] | None:
    """Why a target's graph cannot be compared here ("not validated") or must fail unrun; None: run it."""
    refusal = _serving_refusal(graph, config)
    if refusal:
        return refusal
    if graph.library is None and needs_library(graph):
        return {"status": NOT_VALIDATED, "reason": f"its MoE runs in {moe_library.DOMAIN}.{moe_library.OP}, from the op "
                f"library {graph.name}/{moe_library.LIBRARY_FILE}: validation loads native code only when named "
                f"(--ort-moe-library PATH, e.g. the artifact's own copy)"}
    reason = backend(graph.name).validation_refusal(graph.dtype)
    return {"status": NOT_VALIDATED, "reason": reason} if reason else None


def router_agreement(ref_iters, target_iters, feeds, layers: range, top_k: int) -> float:
    """Share of (real token, layer in `layers`) whose top-k expert set equals the reference's."""
    matches = total = 0
    for ref, out, feed in zip(ref_iters, target_iters, feeds):
        mask = feed["attention_mask"]
        seq = np.asarray(ref[router_logits_name(layers[0])]).shape[0] // mask.shape[0] if layers else 0
        real = mask[:, mask.shape[1] - seq:].reshape(-1).astype(bool)
        for i in layers:
            name = router_logits_name(i)
            _, ref_e = route(torch.from_numpy(np.asarray(ref[name], dtype=np.float32)), top_k)
            _, out_e = route(torch.from_numpy(np.asarray(out[name], dtype=np.float32)), top_k)
            same = (ref_e.sort(-1).values == out_e.sort(-1).values).all(-1).numpy()
            matches += int(same[real].sum())
            total += int(real.sum())
    return matches / max(total, 1)


def validate_artifact(root: Path, manifest: Manifest, ckpt: Checkpoint | None, progress: Progress, decode_steps: int = 4,
                      verify_hashes: bool = False, write_report: bool = True, mode: str = "auto",
                      quant_thresholds: QuantThresholds | None = None,
                      ort_moe_library: Path | None = None) -> dict[str, Any]:
    """Compare every target the artifact in `root` holds against the reference built from `ckpt`.

    What is compared comes from the files (`artifact_targets`), each graph at the tolerance of its
    own dtype. A target is "pass", "fail", or "not validated" (with a reason) when it cannot be
    run here; the artifact has passed only when every target passed and at least one was compared.

    Args:
        root: OUT (or the build's staging folder).
        manifest: its manifest; schema-checked here too.
        ckpt: the reference weights (None only for a manifest that lists no target: nothing to compare).
        progress: one line per step.
        decode_steps: greedy steps after the prefill.
        verify_hashes: compare every file's sha256 with the manifest (sizes are always compared):
            `build` passes the manifest of files it has just hashed while writing them. Whole-model
            validation hashes them before comparing; streamed validation hashes each weight file as
            its stages are about to load it, once (`inventory.FileHashes`), and the rest after the
            comparison: a changed file fails validation either way.
        write_report: write the report to `root/validation.json` (atomically).
        mode: "whole", "streamed" (one stage at a time, `validate.streamed`) or "auto" (streamed
            when the whole model does not fit in the memory available); the report records it.
        quant_thresholds: the gates of a quantized artifact's quantization error (`quant_parity`;
            None: the defaults of its bit width). Such an artifact is compared with the dequantized
            reference at the usual tolerances, and with the full-precision one under these gates.
        ort_moe_library: the op library to load for a graph whose MoE runs in it (`build
            --ort-moe-library`); checked against the reference on a probe first. Without it such a
            graph is "not validated": native code from an artifact is loaded only when named.

    Returns:
        the report: per-target results, `passed`, and `summary` (`passed`, `targets`,
        `failed_targets`, `router_agreement`, `not_validated`, `compared`).

    Raises:
        MixexportError: when the artifact disagrees with its manifest, or the report cannot be written.
    """
    check_manifest(manifest.to_json(), str(root / MANIFEST))
    hashes = FileHashes() if verify_hashes else None
    graphs = artifact_targets(root, manifest, hashes)
    dtype = manifest.dtype  # every graph's own dtype, which artifact_targets checked
    tolerances = TOLERANCES[dtype]
    report: dict[str, Any] = {"dtype": dtype, "scenario": {"batch": 2, "prompt": 7, "left_pad": 3,
                                                           "decode_steps": decode_steps},
                              "tolerances": {k: {"atol": a, "rtol": r} for k, (a, r) in tolerances.items()},
                              "min_router_agreement": MIN_ROUTER_AGREEMENT, "targets": {}}
    quant = scheme_of(manifest)
    if quant is not None:
        report["experts_quant"] = {"scheme": quant.name, "reference": "dequantized experts (exactness), and "
                                   "the full-precision reference (quantization error)",
                                   "thresholds": (quant_thresholds or QuantThresholds()).resolve(quant)}
    if graphs and ckpt is None:
        raise InternalError("validate_artifact has targets to compare but was given no reference checkpoint")
    to_run = []
    users = [graph for graph in graphs.values() if needs_library(graph)]
    if ort_moe_library is not None and users:
        check_library(Path(ort_moe_library))
        for graph in users:
            graph.library = Path(ort_moe_library)
    elif ort_moe_library is not None:
        progress(f"--ort-moe-library: no graph of this artifact runs {moe_library.DOMAIN}.{moe_library.OP}; not loaded")
    for name, graph in graphs.items():
        status = not_run_status(graph, ckpt.config)
        if status:
            report["targets"][name] = status
        else:
            to_run.append((name, graph))
        if graph.engine:
            status = engine_not_run_status(graph, ckpt.config)
            if status:
                report["targets"][ENGINE_TARGET] = status
            else:
                to_run.append((ENGINE_TARGET, None))
    if to_run:
        report["mode"] = choose_mode(mode, ckpt.config, dtype, progress)
    if hashes is not None and report.get("mode") != "streamed":
        _finish_hashes(hashes, progress)  # whole-model sessions load every weight at once: hash them first
    if to_run and report["mode"] == "streamed":
        for name, graph in list(to_run):
            if graph is not None and graph_kv_layout(graph.model) == "shared":
                # Fail closed: the stage graphs of a shared-buffer graph are not cut or fed yet.
                to_run.remove((name, graph))
                report["targets"][name] = {
                    "status": NOT_VALIDATED, "reason": "streamed validation of the shared KV layout is not "
                                                       "implemented: validate with --validation-mode whole on a "
                                                       "machine that holds the model"}
        if (ENGINE_TARGET, None) in to_run:
            to_run.remove((ENGINE_TARGET, None))
            report["targets"][ENGINE_TARGET] = {
                "status": NOT_VALIDATED, "reason": "streamed validation compares stage graphs in onnxruntime, not the "
                                                   "engine: validate with --validation-mode whole on a machine that "
                                                   "holds the model"}
        progress(f"validating against the PyTorch reference one stage at a time ({dtype}, prefill + {decode_steps} "
                 f"decode steps, batch 2, left padding)")
        report["scenario"]["decode_tokens"] = "seeded random"  # greedy ones need every layer per step
        report["targets"].update(streamed_compare(to_run, ckpt, dtype, tolerances, decode_steps, progress, quant=quant,
                                                  quant_thresholds=report.get("experts_quant", {}).get("thresholds"),
                                                  hashes=hashes))
    elif to_run:
        num_layers, top_k = ckpt.config.num_hidden_layers, ckpt.config.num_experts_per_tok
        progress(f"validating against the PyTorch reference ({dtype}, prefill + {decode_steps} decode steps, "
                 f"batch 2, left padding)")
        recorder = RecordingMoE()
        model = load_reference(ckpt, dtype=torch_dtype(dtype), moe_impl=recorder)
        feeds = scenario_feeds(model, dtype, decode_steps=decode_steps)  # teacher-forced at full precision
        check_quant = None
        if quant is not None:
            with G_LOGGER.verbosity(G_LOGGER.ERROR):
                full = Comparator.run([TorchReferenceRunner(model, recorder, name="full-precision")], data_loader=feeds)
            full_iters = next(iter(full.values()))
            recorder.quant = quant  # the reference of the exactness check: the stored experts

            def check_quant(target_iters):
                has_router = bool(num_layers) and router_logits_name(0) in target_iters[0]
                agreement = (router_agreement(full_iters, target_iters, feeds, range(num_layers), top_k) if has_router
                             else None)
                return quantization_error(full_iters, target_iters, feeds, agreement,
                                          report["experts_quant"]["thresholds"])
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            reference = Comparator.run([TorchReferenceRunner(model, recorder)], data_loader=feeds)
        ref_name, ref_iters = next(iter(reference.items()))
        for name, graph in to_run:
            if graph is None:
                def make_runner():
                    return engine_runner(root, name=ENGINE_TARGET)
            else:
                def make_runner(graph=graph):
                    return OnnxrtRunner(session_loader(graph, num_layers), name=graph.name)
            expected = ref_iters
            if graph is not None and graph_kv_layout(graph.model) == "shared":
                make_runner = _shared_runner(make_runner, num_layers)
                expected = [IterationResult(zero_padding(r, f), runner_name=ref_name) for r, f in zip(ref_iters, feeds)]
            report["targets"][name] = _compare_target(make_runner, ref_name, expected, feeds, tolerances,
                                                      range(num_layers), top_k, check_quant)
            if expected is not ref_iters:
                report["targets"][name]["compared"] = "real-token positions (shared KV layout: padding is not " \
                                                      "part of its contract)"
    staged = [(name, graph) for name, graph in to_run if graph is not None and graph.stages
              and report["targets"][name]["status"] != NOT_VALIDATED]
    if staged:  # each stage graph and the chain too (`validate.staged`), whatever the mode
        for name, result in compare_stages(staged, ckpt, dtype, tolerances, decode_steps, progress, hashes).items():
            report["targets"][name] = with_stages(report["targets"][name], result)
    if hashes is not None:  # streamed: what the stages did not read; a changed file fails before any verdict
        _finish_hashes(hashes, progress)
    report["targets"] = {t: report["targets"][t] for t in [*graphs, ENGINE_TARGET] if t in report["targets"]}
    statuses = {t: r["status"] for t, r in report["targets"].items()}
    failed = [t for t, s in statuses.items() if s == "fail"]
    not_validated = [t for t, s in statuses.items() if s == NOT_VALIDATED]
    compared = sum(s in ("pass", "fail") for s in statuses.values())  # what was actually compared
    passed = compared > 0 and all(s == "pass" for s in statuses.values())
    report["passed"] = passed
    if compared == 0:
        report["reason"] = "compared nothing: " + ("the artifact holds no target" if not statuses else
                                                   "no target could be run here")
    report["summary"] = {"passed": passed, "targets": statuses, "failed_targets": failed,
                         "router_agreement": {t: r.get("router_agreement") for t, r in report["targets"].items()},
                         "not_validated": not_validated, "compared": compared,
                         **({"mode": report["mode"]} if "mode" in report else {})}
    if write_report:
        write_json_atomic(root / REPORT_FILE, report)
    return report


def _finish_hashes(hashes: FileHashes, progress: Progress) -> None:
    """Complete the sha256 checks of the artifact's files (`FileHashes.finish`), saying how long it took."""
    start = time.perf_counter()
    hashes.finish()
    progress(f"checksums: the artifact's files match the manifest's sha256 ({time.perf_counter() - start:.1f}s)")


def _shared_runner(make_runner: Callable, num_layers: int) -> Callable:
    """`make_runner` of a shared-KV-layout graph, fed and read back in the scenario's layout."""
    return lambda: SharedBufferRunner(make_runner(), num_layers)


def _compare_target(make_runner, ref_name, ref_iters, feeds, tolerances, layers: range, top_k,
                    check_quant=None, on_outputs=None, phases=None) -> dict[str, Any]:
    """Run one target (or one stage of it: `layers` are those whose router logits it outputs) on
    the scenario and compare it with the reference's outputs (those of the target's that the
    reference does not have are not compared).

    A target that onnxruntime (or TensorRT) cannot load or run has failed; its error is the reason.
    `check_quant` (quantized artifacts): the target's outputs -> its quantization-error record
    (`quant_parity.quantization_error`), which fails the target when a gate is missed.
    `on_outputs`: receives the target's outputs per step, once it has run (a stage chain passes
    them on to the next stage).
    `phases` (streamed validation's `PhaseTimes`): times the run ("session run") and the comparison.
    """
    phases = phases or (lambda _: contextlib.nullcontext())
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR), phases("session run"):
            runner = make_runner()
            results = Comparator.run([runner], data_loader=feeds)
    except Exception as exc:  # any runtime error from a broken graph: the target did not compute
        first = (str(exc).strip().splitlines() or [""])[0][:400]
        return {"status": "fail", "reason": f"could not run: {type(exc).__name__}: {first}"}
    with phases("compare"):
        return _compared(ref_name, ref_iters, results, feeds, tolerances, layers, top_k, check_quant, on_outputs)


def _compared(ref_name, ref_iters, results, feeds, tolerances, layers: range, top_k, check_quant,
              on_outputs) -> dict[str, Any]:
    """`_compare_target`'s verdict on the target's run `results`."""
    name, target_iters = next(iter(results.items()))
    if on_outputs is not None:
        on_outputs(target_iters)
    both = RunResults()
    both.append((ref_name, ref_iters))
    both.append((name, target_iters))
    output_names = list(ref_iters[0].keys())
    atol = {n: tolerances[output_group(n)][0] for n in output_names}
    rtol = {n: tolerances[output_group(n)][1] for n in output_names}
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            accuracy = Comparator.compare_accuracy(
                both, comparisons=[(1, 0)],
                compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise"))
    except Exception as exc:  # e.g. an output of the wrong shape: the target did not compute the contract
        first = (str(exc).strip().splitlines() or [""])[0][:400]
        return {"status": "fail", "reason": f"outputs not comparable: {type(exc).__name__}: {first}"}
    result = _target_report(accuracy, target_iters, ref_iters, feeds, layers, top_k)
    if check_quant is not None:
        result["quantization"] = check_quant(target_iters)
        if not result["quantization"]["passed"]:
            result["status"] = "fail"
    return result


def _target_report(accuracy, target_iters, ref_iters, feeds, layers: range, top_k) -> dict[str, Any]:
    max_abs: dict[str, float | None] = {}  # None: a non-finite difference (NaN or inf in an output)
    failed_outputs: set[str] = set()
    # AccuracyResults: one AccuracyResult per compare function, each {runner pair: [per iteration:
    # {output name: OutputCompareResult}]}.
    for result_per_func in accuracy:
        for iterations in result_per_func.values():
            for outputs in iterations:
                for name, result in outputs.items():
                    group = output_group(name)
                    diff = float(result.max_absdiff)
                    if not math.isfinite(diff) or max_abs.get(group, 0.0) is None:
                        max_abs[group] = None
                        failed_outputs.add(name)
                    else:
                        max_abs[group] = max(max_abs.get(group, 0.0), diff)
                    if not bool(result):
                        failed_outputs.add(name)
    # The engine has no router-logit outputs (they are not part of the deployed graph).
    has_router = bool(layers) and router_logits_name(layers[0]) in target_iters[0]
    agreement = router_agreement(ref_iters, target_iters, feeds, layers, top_k) if has_router else None
    passed = not failed_outputs and (agreement is None or agreement >= MIN_ROUTER_AGREEMENT)
    return {"status": "pass" if passed else "fail", "max_abs_diff": max_abs, "router_agreement": agreement,
            "failed_outputs": sorted(failed_outputs)}


def _check_model(manifest: Manifest, config: MixtralConfig, what: str) -> None:
    """The reference's config must be the model the manifest says was exported (fields a newer
    config may have added are not compared)."""
    summary = config.summary()
    for key, value in manifest.model.items():
        if key in summary and summary[key] != value:
            raise MixexportError(f"{what}: {key} is {summary[key]!r} but the artifact's manifest records model.{key} "
                                 f"= {value!r}: not the model this artifact was exported from")


def _check_reference_size(root: Path, manifest: Manifest, config: MixtralConfig) -> None:
    """Regenerating a preset's reference writes and loads the whole model: refuse a manifest whose
    `source.config` describes far more weights than any target of the artifact holds (every
    target stores all of them), before anything is allocated or written."""
    held = max(sum((root / f["path"]).stat().st_size for f in entry.files)
               for entry in manifest.targets.values())
    needed = weight_count(config) * torch_dtype(manifest.dtype).itemsize
    if needed > 2 * held + 2**20:
        raise MixexportError(f"{root / MANIFEST}: source.config describes {needed} bytes of "
                             f"{manifest.dtype} weights, but the largest target holds {held} bytes: the source "
                             f"does not describe this artifact")


def validate_out(out: str | Path, checkpoint: str | Path | None = None, report_path: str | Path | None = None,
                 progress: Progress = lambda _: None, allow_non_finite: bool = False,
                 mode: str = "auto",
                 quant_thresholds: QuantThresholds | None = None,
                 ort_moe_library: str | Path | None = None) -> tuple[dict[str, Any], list[Path]]:
    """`mixexport validate OUT`: check the artifact's files, find the reference weights the manifest
    names and compare. Writes nothing into OUT but validation.json, and that only where OUT is
    writable. `mode`: as `validate_artifact`'s.

    Returns:
        (the report, the paths it was written to).

    Raises:
        MixexportError: when the artifact's files or the reference weights are gone or changed.
    """
    root = Path(out)
    manifest = read_manifest(root)
    source = manifest.source

    def compare(ckpt: Checkpoint | None) -> dict[str, Any]:
        return validate_artifact(root, manifest, ckpt, progress, verify_hashes=True, write_report=False, mode=mode,
                                 quant_thresholds=quant_thresholds, ort_moe_library=ort_moe_library)

    if source["kind"] == "checkpoint":
        path = Path(checkpoint or source["path"])
        try:
            found = path.is_dir()
        except (OSError, ValueError) as exc:  # ENAMETOOLONG, a NUL in --checkpoint, ...
            raise MixexportError(f"reference checkpoint {path}: {exc}") from None
        if not found:
            raise MixexportError(f"reference checkpoint {path} (recorded at build time) is gone; "
                                 f"pass --checkpoint DIR with the same files")
        ckpt = Checkpoint(path, allow_non_finite=allow_non_finite)
        _check_model(manifest, ckpt.config, f"reference checkpoint {path}")
        report = compare(ckpt)
        # After the comparison, not before: the reference has read (and so hashed) every weight, so
        # this reads nothing more; before it, it would read the whole checkpoint (93 GB for Mixtral
        # 8x7B) a second time. A changed checkpoint still fails here, before any report is written.
        start = time.perf_counter()
        verify_checkpoint(ckpt, source["files"], f"reference checkpoint {path}")
        progress(f"checksums: the reference checkpoint's weights are the build's ({time.perf_counter() - start:.1f}s)")
    else:
        if checkpoint is not None:
            raise MixexportError(f"{out} was built from preset {source['preset']!r} (seed {source['seed']}); "
                                 f"its reference is regenerated, --checkpoint does not apply")
        config = MixtralConfig.from_hf_dict(source["config"], f"{root / MANIFEST}: source.config")
        _check_model(manifest, config, f"{root / MANIFEST}: source.config")
        if not manifest.targets:  # nothing will be compared: no reference to regenerate
            report = compare(None)
        else:
            _check_reference_size(root, manifest, config)
            with tempfile.TemporaryDirectory(prefix="mixexport-reference-") as tmp:
                progress(f"regenerating the {source['preset']} reference weights (seed {source['seed']})")
                ckpt = Checkpoint(write_checkpoint(Path(tmp) / "checkpoint", config, seed=source["seed"]))
                report = compare(ckpt)
    written = []
    if os.access(root, os.W_OK):
        try:
            write_json_atomic(root / REPORT_FILE, report)
            written.append(root / REPORT_FILE)
        except MixexportError as exc:
            progress(f"the report was not written into {root}: {exc}")
    else:
        progress(f"{root} is not writable: the report is not written there" +
                 ("" if report_path else " (give --report FILE to keep it)"))
    if report_path:
        write_json_atomic(Path(report_path), report)
        written.append(Path(report_path))
    return report, written
