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

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from mixexport import graph_io
from mixexport.graph_io import router_logits_name
from mixexport.artifact.manifest import read_manifest, verify_checkpoint, verify_files
from mixexport.checkpoint.config import MixtralConfig
from mixexport.checkpoint.reader import Checkpoint
from mixexport.checkpoint.writer import write_checkpoint
from mixexport.dtypes import torch_dtype
from mixexport.errors import MixexportError
from mixexport.model.decoder import load_reference
from mixexport.model.moe import route
from mixexport.targets import backend
from mixexport.targets.trt.engine import gpu_name, require_tensorrt
from mixexport.validate.reference_runner import RecordingMoE, TorchReferenceRunner

Progress = Callable[[str], None]
REPORT_FILE = "validation.json"

# (atol, rtol) per output group and dtype. fp32 targets must match to round-off; fp16/bf16 targets
# differ from the reference (same dtype) by accumulation order, amplified through the layers.
TOLERANCES = {
    "float32": {"logits": (1e-4, 1e-3), "present": (1e-4, 1e-3), "router_logits": (1e-4, 1e-3)},
    "float16": {"logits": (2e-2, 2e-2), "present": (2e-2, 2e-2), "router_logits": (2e-2, 2e-2)},
    "bfloat16": {"logits": (1e-1, 5e-2), "present": (1e-1, 5e-2), "router_logits": (1e-1, 5e-2)},
}
# Below this share of matching (token, layer) top-k sets a target fails even within tolerance.
MIN_ROUTER_AGREEMENT = 0.98


def output_group(name: str) -> str:
    if name.startswith("present."):
        return "present"
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


def validation_copy(root: Path, target: str, entry: dict, num_layers: int) -> Path:
    """A copy of a target's model.onnx that also outputs router logits and, for trt, runs the
    plugin node through the CPU stand-in.

    The copy is written beside the original (onnxruntime only reads external data from the
    model's own directory, symlinks resolved) and shares its weights file; the caller removes it.
    """
    src = root / entry["onnx"]
    model = onnx.load(str(src), load_external_data=False)
    past_key = graph_io.past_names(0)[0]
    elem = next((v.type.tensor_type.elem_type for v in model.graph.input if v.name == past_key), onnx.TensorProto.FLOAT)
    for i in range(num_layers):
        model.graph.output.append(onnx.helper.make_tensor_value_info(router_logits_name(i), elem, None))
    backend(target).prepare_validation_model(model, elem)
    path = src.with_name(f".validation-{os.getpid()}-{src.name}")
    onnx.save(model, str(path))
    return path


def _session_loader(path: Path, target: str):
    def load():
        import onnxruntime as ort

        options = ort.SessionOptions()
        backend(target).configure_session(options)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return load


def _engine_skip_reason() -> str | None:
    try:
        require_tensorrt()
    except MixexportError as exc:
        return str(exc)
    return None if gpu_name() else "no NVIDIA GPU visible to CUDA"


def router_agreement(ref_iters, target_iters, feeds, num_layers: int, top_k: int) -> float:
    """Share of (real token, layer) whose top-k expert set equals the reference's."""
    matches = total = 0
    for ref, out, feed in zip(ref_iters, target_iters, feeds):
        seq = feed["input_ids"].shape[1]
        real = feed["attention_mask"][:, -seq:].reshape(-1).astype(bool)
        for i in range(num_layers):
            name = router_logits_name(i)
            _, ref_e = route(torch.from_numpy(np.asarray(ref[name], dtype=np.float32)), top_k)
            _, out_e = route(torch.from_numpy(np.asarray(out[name], dtype=np.float32)), top_k)
            same = (ref_e.sort(-1).values == out_e.sort(-1).values).all(-1).numpy()
            matches += int(same[real].sum())
            total += int(real.sum())
    return matches / max(total, 1)


def validate_artifact(root: Path, manifest: dict, ckpt: Checkpoint, progress: Progress,
                      decode_steps: int = 4) -> dict[str, Any]:
    """Compare every target in `root` against the reference built from `ckpt`; write the report.

    Returns:
        the report dict (also written to `root/validation.json`).
    """
    dtype = manifest["dtype"]
    config = ckpt.config
    num_layers, top_k = config.num_hidden_layers, config.num_experts_per_tok
    recorder = RecordingMoE()
    progress(f"validating against the PyTorch reference ({dtype}, prefill + {decode_steps} decode steps, batch 2, "
             f"left padding)")
    model = load_reference(ckpt, dtype=torch_dtype(dtype), moe_impl=recorder)
    feeds = scenario_feeds(model, dtype, decode_steps=decode_steps)
    tolerances = TOLERANCES[dtype]
    report: dict[str, Any] = {"dtype": dtype, "scenario": {"batch": 2, "prompt": 7, "left_pad": 3,
                                                           "decode_steps": decode_steps},
                              "tolerances": {k: {"atol": a, "rtol": r} for k, (a, r) in tolerances.items()},
                              "min_router_agreement": MIN_ROUTER_AGREEMENT, "targets": {}}
    reference = TorchReferenceRunner(model, recorder)
    runners, names, copies = [reference], [], []
    try:
        for target, entry in manifest["targets"].items():
            refusal = backend(target).validation_refusal(dtype)
            if refusal:
                report["targets"][target] = {"status": "skipped", "reason": refusal}
                continue
            copies.append(validation_copy(root, target, entry, num_layers))
            runners.append(OnnxrtRunner(_session_loader(copies[-1], target), name=target))
            names.append(target)
        engine = manifest["targets"].get("trt", {}).get("engine", {})
        if engine.get("file"):
            skip = _engine_skip_reason()
            if skip:
                report["targets"]["trt-engine"] = {"status": "skipped", "reason": skip}
            else:
                from mixexport.targets.trt.runner import engine_runner

                runners.append(engine_runner(root))
                names.append("trt-engine")
        if names:
            with G_LOGGER.verbosity(G_LOGGER.ERROR):
                results = Comparator.run(runners, data_loader=feeds)
            output_names = list(results[0][1][0].keys())
            atol = {n: tolerances[output_group(n)][0] for n in output_names}
            rtol = {n: tolerances[output_group(n)][1] for n in output_names}
            ref_iters = results[0][1]
            for k, target in enumerate(names, start=1):
                with G_LOGGER.verbosity(G_LOGGER.ERROR):
                    accuracy = Comparator.compare_accuracy(
                        results, comparisons=[(k, 0)],
                        compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise"))
                report["targets"][target] = _target_report(accuracy, results[k][1], ref_iters, feeds, num_layers,
                                                           top_k)
    finally:
        for copy in copies:
            copy.unlink(missing_ok=True)
    statuses = {t: r["status"] for t, r in report["targets"].items()}
    failed = [t for t, s in statuses.items() if s == "fail"]
    report["passed"] = not failed
    report["summary"] = {"passed": not failed, "targets": statuses, "failed_targets": failed,
                         "not_validated": [t for t, s in statuses.items() if s == "skipped"], "compared": len(names),
                         "router_agreement": {t: r.get("router_agreement") for t, r in report["targets"].items()}}
    (root / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _target_report(accuracy, target_iters, ref_iters, feeds, num_layers, top_k) -> dict[str, Any]:
    max_abs: dict[str, float] = {}
    failed_outputs: set[str] = set()
    # AccuracyResults: one AccuracyResult per compare function, each {runner pair: [per iteration:
    # {output name: OutputCompareResult}]}.
    for result_per_func in accuracy:
        for iterations in result_per_func.values():
            for outputs in iterations:
                for name, result in outputs.items():
                    group = output_group(name)
                    max_abs[group] = max(max_abs.get(group, 0.0), float(result.max_absdiff))
                    if not bool(result):
                        failed_outputs.add(name)
    # The engine has no router-logit outputs (they are not part of the deployed graph).
    has_router = router_logits_name(0) in target_iters[0] if num_layers else False
    agreement = router_agreement(ref_iters, target_iters, feeds, num_layers, top_k) if has_router else None
    passed = not failed_outputs and (agreement is None or agreement >= MIN_ROUTER_AGREEMENT)
    return {"status": "pass" if passed else "fail", "max_abs_diff": max_abs, "router_agreement": agreement,
            "failed_outputs": sorted(failed_outputs)}


def validate_out(out: str | Path, checkpoint: str | Path | None = None, report_path: str | Path | None = None,
                 progress: Progress = lambda _: None) -> dict[str, Any]:
    """`mixexport validate OUT`: find the reference weights the manifest names and compare.

    Raises:
        MixexportError: when the artifact's files or the reference weights are gone or changed.
    """
    root = Path(out)
    manifest = read_manifest(root)
    for target, entry in manifest["targets"].items():
        for part in (entry, entry.get("kernels", {}), entry.get("engine", {})):
            verify_files(root, part.get("files", []), f"target {target}")
    source = manifest["source"]
    if source["kind"] == "checkpoint":
        path = Path(checkpoint or source["path"])
        if not path.is_dir():
            raise MixexportError(f"reference checkpoint {path} (recorded at build time) is gone; "
                                 f"pass --checkpoint DIR with the same files")
        ckpt = Checkpoint(path)
        verify_checkpoint(ckpt, source["files"], f"reference checkpoint {path}")
        report = validate_artifact(root, manifest, ckpt, progress)
    else:
        if checkpoint is not None:
            raise MixexportError(f"{out} was built from preset {source['preset']!r} (seed {source['seed']}); "
                                 f"its reference is regenerated, --checkpoint does not apply")
        config = MixtralConfig.from_hf_dict(source["config"], "manifest source.config")
        with tempfile.TemporaryDirectory(prefix="mixexport-reference-") as tmp:
            progress(f"regenerating the {source['preset']} reference weights (seed {source['seed']})")
            ckpt = Checkpoint(write_checkpoint(Path(tmp) / "checkpoint", config, seed=source["seed"]))
            report = validate_artifact(root, manifest, ckpt, progress)
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report
