"""`mixexport build`: checkpoint -> captured graph -> one lowered graph per target -> OUT.

The artifact is assembled in a temporary directory beside OUT and renamed into place at the end,
so an interrupted or failed build never leaves a half artifact and never replaces a good one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx_ir as ir

from mixexport import graph_io
from mixexport.artifact.manifest import (FORMAT_VERSION, checkpoint_entries, file_entry, tool_versions,
                                         write_manifest)
from mixexport.artifact.save import ONNX_FILE, save_model
from mixexport.capture.export import attach_checkpoint_weights, capture_decoder
from mixexport.checkpoint.config import MixtralConfig, preset
from mixexport.checkpoint.reader import Checkpoint
from mixexport.checkpoint.writer import write_checkpoint
from mixexport.errors import InternalError, MixexportError
from mixexport.passes.pipeline import LOWERINGS, lower_for_target

TARGETS = tuple(LOWERINGS)
# What each target's runtime runs. onnxruntime's CPU kernels have no bfloat16 for most ops (and
# com.microsoft.MoE has none), so the ort target refuses it; TensorRT and plain ONNX accept it.
TARGET_DTYPES = {"portable": ("float32", "float16", "bfloat16"), "ort": ("float32", "float16"),
                 "trt": ("float32", "float16", "bfloat16")}
MOE_OPS = {"portable": None, "ort": "com.microsoft.MoE", "trt": "trt.plugins.MixtralMoE"}

Progress = Callable[[str], None]


@dataclasses.dataclass
class BuildOptions:
    targets: tuple[str, ...] = TARGETS
    dtype: str | None = None  # None: the checkpoint's, where every target supports it
    max_batch: int = 8
    max_sequence: int = 2048  # new tokens per call (prefill length)
    max_context: int | None = None  # past + new; default: max_position_embeddings capped at 8192
    force: bool = False
    validate: bool = True
    plugin: str | None = None  # MixtralMoE plugin library, for the trt engine
    trt_kernels: bool = True  # AOT-compile the plugin's Triton kernels into OUT/trt/kernels


def resolve_dtype(config: MixtralConfig, requested: str | None, targets: tuple[str, ...],
                  progress: Progress) -> str:
    """The one dtype of every graph in this build.

    A bfloat16 checkpoint builds float16 by default: one dtype that every target, onnxruntime's
    CPU kernels included, runs and validates. `--dtype bfloat16` keeps bf16 for portable and trt.
    """
    if requested:
        for target in targets:
            if requested not in TARGET_DTYPES[target]:
                raise MixexportError(f"--dtype {requested} is not supported by target {target} "
                                     f"(supported: {', '.join(TARGET_DTYPES[target])})")
        return requested
    if config.dtype == "bfloat16":
        progress("checkpoint is bfloat16; building float16, which onnxruntime's CPU kernels run "
                 "(--dtype bfloat16 keeps bf16 for the portable and trt targets, --dtype float32 is exact)")
        return "float16"
    return config.dtype


@contextmanager
def reference_source(checkpoint: str | Path | None, preset_name: str | None, seed: int,
                     overrides: dict[str, Any], progress: Progress) -> Iterator[tuple[Checkpoint, dict]]:
    """Open the checkpoint to export, writing a random one for `--preset`; yields it with the
    manifest's `source` record (how validation finds the same weights again). A checkpoint's
    `files` are filled in by `build`, from the digests of the tensors its export reads."""
    if (checkpoint is None) == (preset_name is None):
        raise MixexportError("give either a CHECKPOINT directory or --preset NAME")
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint)
        yield ckpt, {"kind": "checkpoint", "path": str(ckpt.path.resolve()), "files": None}
        return
    config = preset(preset_name).replace(**overrides)
    with tempfile.TemporaryDirectory(prefix="mixexport-preset-") as tmp:
        progress(f"writing a random {preset_name} checkpoint (seed {seed})")
        path = write_checkpoint(Path(tmp) / "checkpoint", config, seed=seed)
        yield Checkpoint(path), {"kind": "preset", "preset": preset_name, "seed": seed,
                                 "config": config.to_hf_dict()}


def dynamic_ranges(options: BuildOptions, config: MixtralConfig) -> dict[str, list[int]]:
    total = options.max_context or min(config.max_position_embeddings, 8192)
    if options.max_sequence > total:
        raise MixexportError(f"--max-sequence {options.max_sequence} exceeds the context length {total}")
    return {graph_io.BATCH: [1, options.max_batch], graph_io.SEQUENCE: [1, options.max_sequence],
            graph_io.PAST: [0, total - 1], graph_io.TOTAL: [1, total]}


def build(ckpt: Checkpoint, source: dict, out: str | Path, options: BuildOptions, progress: Progress) -> dict:
    """Build every requested target into OUT.

    Returns:
        the manifest (with the validation summary when validation ran).

    Raises:
        MixexportError: for an existing OUT without force, an unsupported dtype, a parity failure.
    """
    out = Path(out)
    if out.exists() and not options.force:
        raise MixexportError(f"{out} already exists; pass --force to replace it")
    for target in options.targets:
        if target not in TARGETS:
            raise MixexportError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    config = ckpt.config
    dtype = resolve_dtype(config, options.dtype, options.targets, progress)
    ranges = dynamic_ranges(options, config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        start = time.perf_counter()
        progress(f"capturing the decoder ({config.num_hidden_layers} layers, {dtype})")
        captured = capture_decoder(config, dtype, max_batch=ranges[graph_io.BATCH][1],
                                   max_sequence=ranges[graph_io.SEQUENCE][1],
                                   max_total=ranges[graph_io.TOTAL][1])
        attach_checkpoint_weights(captured, ckpt, dtype)
        progress(f"captured in {time.perf_counter() - start:.1f}s")
        targets = {}
        for target in options.targets:
            targets[target] = _build_target(captured, target, config, dtype, tmp, progress)
        if "trt" in targets and options.trt_kernels:
            targets["trt"]["kernels"] = _write_trt_kernels(tmp, config, dtype, progress)
        if source["kind"] == "checkpoint":
            # Every weight was read (and hashed) by the export; nothing is read a second time.
            source = {**source, "files": checkpoint_entries(ckpt)}
        manifest = {
            "format": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tools": tool_versions(),
            "model": config.summary(),
            "dtype": dtype,
            "source": source,
            "dynamic_dims": ranges,
            "targets": targets,
        }
        if "trt" in targets:
            _try_engine(tmp, out, manifest, options, progress)
        write_manifest(tmp, manifest)
        if options.validate:
            from mixexport.validate.parity import validate_artifact

            report = validate_artifact(tmp, manifest, ckpt, progress=progress)
            manifest["validation"] = report["summary"]
            write_manifest(tmp, manifest)
            if not report["passed"]:
                failed = out.with_name(out.name + ".failed")
                shutil.rmtree(failed, ignore_errors=True)
                os.replace(tmp, failed)
                raise MixexportError(f"parity validation failed ({report['summary']['failed_targets']}); "
                                     f"the artifact was kept for inspection in {failed}, {out} was not touched")
        _install(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_target(captured: ir.Model, target: str, config: MixtralConfig, dtype: str, root: Path,
                  progress: Progress) -> dict:
    start = time.perf_counter()
    model = captured.clone()
    rewrites = lower_for_target(model, target, config.num_hidden_layers)
    folder = root / target
    folder.mkdir()
    files = save_model(model, folder, root, target, progress)
    progress(f"{target}: {config.num_hidden_layers} MoE nodes lowered, {sum(f['bytes'] for f in files) / 1e6:.1f} MB "
             f"written in {time.perf_counter() - start:.1f}s")
    return {
        "dtype": dtype,
        "files": files,
        "onnx": f"{target}/{ONNX_FILE}",
        "inputs": [b.as_dict() for b in graph_io.inputs(config, dtype)],
        "outputs": [b.as_dict() for b in graph_io.outputs(config, dtype)],
        "moe_op": MOE_OPS[target],
        "moe_nodes": rewrites[f"lower_moe_{target}"],
        "passes": rewrites,
    }


# The plugin's Triton kernels exist for these graph dtypes (fp32 tiles do not fit shared memory).
KERNEL_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}
KERNEL_ARCHS = "80,86,89,90"


def _write_trt_kernels(root: Path, config: MixtralConfig, dtype: str, progress: Progress) -> dict:
    """AOT-compile the MixtralMoE kernels (cubin + PTX + metadata) into OUT/trt/kernels, which the
    plugin's CMake build embeds (-DMIXEXPORT_AOT_DIR)."""
    from mixexport.kernels.configs import AOT_MAX_EXPERTS

    if dtype not in KERNEL_DTYPES:
        progress(f"trt: no plugin kernels for {dtype} graphs (they exist for float16 and bfloat16); "
                 f"build with --dtype float16 or bfloat16 for a TensorRT engine")
        return {"status": "skipped", "reason": f"no {dtype} kernels"}
    # The kernels vectorize along H and I and size their routing blocks for at most 64 experts.
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    if h % 16 or i % 16 or e > AOT_MAX_EXPERTS:
        progress(f"trt: the plugin's kernels need hidden and intermediate sizes that are multiples of 16 and at "
                 f"most {AOT_MAX_EXPERTS} experts; this model (H {h}, I {i}, E {e}) cannot use the TensorRT engine")
        return {"status": "skipped", "reason": f"unsupported shapes (H {h}, I {i}, E {e})"}
    if importlib.util.find_spec("triton") is None:
        progress("trt: kernels not compiled: triton is missing (pip install 'mixexport[kernels]')")
        return {"status": "skipped", "reason": "triton not installed"}
    start = time.perf_counter()
    folder = root / "trt" / "kernels"
    # A subprocess, without TRITON_INTERPRET: the AOT compile must see real GPU targets.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "mixexport.kernels.aot", "--arch", KERNEL_ARCHS,
                          "--dtype", KERNEL_DTYPES[dtype], "-o", str(folder)], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise InternalError(f"AOT kernel compile failed:\n{run.stderr[-2000:]}")
    files = sorted(folder.iterdir())
    progress(f"trt: {len(files)} kernel files for sm_{KERNEL_ARCHS.replace(',', ', sm_')} compiled in "
             f"{time.perf_counter() - start:.1f}s")
    return {"status": "compiled", "dir": "trt/kernels", "archs": [int(a) for a in KERNEL_ARCHS.split(",")],
            "dtype": KERNEL_DTYPES[dtype], "files": [file_entry(f, root) for f in files]}


def _try_engine(root: Path, out: Path, manifest: dict, options: BuildOptions, progress: Progress) -> None:
    """Build the TensorRT engine where TensorRT, a GPU and the plugin are at hand; otherwise say how."""
    from mixexport.targets.trt import engine

    entry = manifest["targets"]["trt"]
    kernels = entry.get("kernels", {})
    if kernels.get("status") == "skipped":
        entry["engine"] = {"status": "not built", "missing": f"plugin kernels ({kernels['reason']})"}
        progress(f"trt: TensorRT-ready ONNX written; no engine for it: {kernels['reason']}")
        return
    missing = None
    if importlib.util.find_spec("tensorrt") is None:
        missing = "TensorRT"
    elif engine.gpu_name() is None:
        missing = "an NVIDIA GPU"
    else:
        try:
            engine.find_plugin_library(options.plugin)
        except MixexportError:
            missing = "the MixtralMoE plugin library"
    if missing:
        entry["engine"] = {"status": "not built", "missing": missing}
        progress(f"trt: TensorRT-ready ONNX written; no engine here (missing {missing}). On a GPU machine:")
        for line in engine.finish_instructions(out, kernels.get("status") == "compiled"):
            progress(f"    {line}")
        return
    entry["engine"] = engine.build_engine(root, manifest, options.plugin, progress=progress)


def _install(tmp: Path, out: Path) -> None:
    """Put the finished artifact at OUT; an old OUT is removed only after the new one is in place.

    Every file is flushed to disk before the rename (the weights already are) and the directory
    after it, so a crash never leaves an OUT whose files are empty or partly written.
    """
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)
    parent = os.open(out.parent, os.O_RDONLY)  # the rename itself is durable once its directory is
    try:
        os.fsync(parent)
    finally:
        os.close(parent)
