"""`mixexport build`: checkpoint -> captured graph -> one lowered graph per target -> OUT.

The artifact is assembled in a staging directory beside OUT and installed with one atomic rename
at the end (`mixexport.artifact.install`), so an interrupted or failed build never leaves a half
artifact and never replaces a good one.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx_ir as ir

from mixexport import graph_io
from mixexport.artifact.install import (check_destination, collect_stale, install, keep_failed, make_staging,
                                        output_lock)
from mixexport.artifact.manifest import Manifest, TargetRecord, checkpoint_entries, file_entry, write_manifest
from mixexport.artifact.save import ONNX_FILE, save_model
from mixexport.artifact.stages import balanced_stages, check_stage_options, part_bytes, save_stages
from mixexport.capture.export import attach_checkpoint_weights, capture_decoder
from mixexport.checkpoint.config import MixtralConfig, preset
from mixexport.checkpoint.names import weight_count
from mixexport.checkpoint.reader import Checkpoint
from mixexport.checkpoint.writer import write_checkpoint
from mixexport.dtypes import torch_dtype
from mixexport.errors import MixexportError
from mixexport.quant import QuantScheme
from mixexport.safe_io import format_bytes
from mixexport.targets import BACKENDS, TARGETS, backend
from mixexport.targets.ort import moe_library
from mixexport.targets.ort.moe_library import check_library
from mixexport.validate.parity import validate_artifact
from mixexport.validate.quant_parity import QuantThresholds
from mixexport.validate.streamed import memory_available, whole_validation_bytes

DEFAULT_MAX_SEQUENCE, DEFAULT_MAX_CONTEXT = 2048, 8192
# What a 2-core machine wrote per target, capture and hashing included (README, Performance): the
# basis of the time estimate printed before a build; more cores write faster.
ESTIMATE_WRITE_BYTES_PER_S = 300e6

Progress = Callable[[str], None]


@dataclasses.dataclass
class BuildOptions:
    targets: tuple[str, ...] | None = None  # None: every target that can serve the model and dtype
    dtype: str | None = None  # None: the checkpoint's (a bfloat16 checkpoint builds float16)
    max_batch: int = 8
    max_sequence: int | None = None  # new tokens per call; default min(2048, the context)
    max_context: int | None = None  # past + new; default: max_position_embeddings capped at 8192
    force: bool = False
    validate: bool = True
    validation_mode: str = "auto"  # or "whole", "streamed"; auto streams what does not fit in memory
    allow_not_validated: bool = False  # accept targets this machine cannot run (exit 0)
    plugin: str | None = None  # MixtralMoE plugin library, for the trt engine
    trt_kernels: bool = True  # AOT-compile the plugin's Triton kernels into OUT/trt/kernels
    experts_quant: QuantScheme | None = None  # weight-only quantized experts (mixexport.quant)
    quant_thresholds: QuantThresholds | None = None  # gates of validation's quantization error; None: defaults
    ort_provider: str = "cpu"  # the onnxruntime provider the ort graph's MoE is lowered for (or "cuda")
    stages: int | None = None  # per target, a chain of this many stage graphs (artifact.stages); None, 1: whole
    kv_layout: str = "concat"  # or "shared": static KV buffers updated in place (ort; graph_io.KV_LAYOUTS)
    ort_moe_library: Path | None = None  # the CPU MoE op library (plugins/ort_moe) the ort graph's MoE runs in


def resolve_dtype(config: MixtralConfig, requested: str | None, progress: Progress) -> str:
    """The one dtype of every graph in this build.

    A bfloat16 checkpoint builds float16 by default: one dtype that every target, onnxruntime's
    CPU kernels included, runs and validates. `--dtype bfloat16` keeps bf16 for portable and trt.
    """
    if requested:
        return requested
    if config.dtype == "bfloat16":
        progress("checkpoint is bfloat16; building float16, which onnxruntime's CPU kernels run "
                 "(--dtype bfloat16 keeps bf16 for the portable and trt targets, --dtype float32 is exact)")
        return "float16"
    return config.dtype


def _target_refusal(target: str, config: MixtralConfig, dtype: str, quant: QuantScheme | None) -> str | None:
    """Why `target` cannot serve this model in `dtype` with `quant` experts, or None."""
    chosen = BACKENDS[target]
    reason = chosen.refusal(config, dtype)
    if reason is None and quant is not None:
        reason = chosen.quant_refusal(config, quant)
    return reason


def resolve_targets(requested: tuple[str, ...] | None, config: MixtralConfig, dtype: str,
                    progress: Progress, quant: QuantScheme | None = None) -> tuple[str, ...]:
    """The targets to build: those asked for (each must be able to serve the model, its experts
    quantized with `quant` when given), or by default every target that can, saying why any
    other is left out.

    Raises:
        MixexportError: for an unknown, repeated or unsupported target, or an empty list.
    """
    what = dtype if quant is None else f"{dtype} with {quant.name} experts"
    if requested is None:
        chosen = []
        for target in TARGETS:
            reason = _target_refusal(target, config, dtype, quant)
            if reason:
                progress(f"{target}: not built for {what}: {reason} (--target {target} --dtype ... to choose)")
            else:
                chosen.append(target)
        if not chosen:
            raise MixexportError(f"no target can serve this model in {what}")
        return tuple(chosen)
    if not requested:
        raise MixexportError(f"--target names no target; choose from {', '.join(TARGETS)}")
    for target in requested:
        backend(target)  # an unknown name is refused with the list of targets
        reason = _target_refusal(target, config, dtype, quant)
        if requested.count(target) > 1:
            raise MixexportError(f"--target names {target} more than once")
        if reason:
            raise MixexportError(f"target {target} cannot be built for {what}: {reason}")
    return requested


def check_moe_library(options: BuildOptions, targets: tuple[str, ...], dtype: str, progress: Progress) -> None:
    """Refuse `--ort-moe-library` where it cannot serve (no ort target, a CUDA graph, float16,
    quantized experts), then load the library and run its op once against the reference."""
    library = options.ort_moe_library
    if library is None:
        return
    what = "--ort-moe-library"
    if "ort" not in targets:
        raise MixexportError(f"{what}: the library is for the ort target, which this build does not write")
    if options.ort_provider != "cpu":
        raise MixexportError(f"{what}: the library is a CPU kernel; it does not go with --ort-provider "
                             f"{options.ort_provider}")
    if dtype != "float32":
        raise MixexportError(f"{what}: the library's op is float32; build with --dtype float32 (this build is {dtype})")
    if options.experts_quant is not None:
        raise MixexportError(f"{what}: the library's op takes full-precision experts; it does not go with "
                             f"--experts-quant")
    check_library(Path(library))
    progress(f"ort: MoE lowered to {moe_library.DOMAIN}.{moe_library.OP} from {library} (loaded, and its op "
             f"matches the reference on a probe)")


def resolve_kv_layouts(requested: str, targets: tuple[str, ...], named: bool, config: MixtralConfig,
                       progress: Progress) -> dict[str, graph_io.KvLayout]:
    """Each target's KV layout: `requested` where the target has it; a target the user named
    (`named`) that lacks it is refused, a default one keeps concat, saying so.

    Raises:
        MixexportError: for an unknown layout, or a named target without it, or no target with it.
    """
    if requested not in graph_io.KV_LAYOUTS:
        raise MixexportError(f"--kv-layout {requested!r}: choose from {', '.join(graph_io.KV_LAYOUTS)}")
    layouts = {}
    for target in targets:
        reason = BACKENDS[target].kv_layout_refusal(requested)
        if reason and named:
            raise MixexportError(f"--kv-layout {requested}: {reason}")
        if reason:
            progress(f"{target}: KV layout concat ({reason})")
        layouts[target] = graph_io.KvLayout("concat" if reason else requested, config.sliding_window)
    if requested != "concat" and all(kv.name == "concat" for kv in layouts.values()):
        raise MixexportError(f"--kv-layout {requested}: none of the targets built ({', '.join(targets)}) has it; "
                             f"add --target ort")
    return layouts


@contextmanager
def reference_source(checkpoint: str | Path | None, preset_name: str | None, seed: int,
                     overrides: dict[str, Any], progress: Progress,
                     allow_non_finite: bool = False) -> Iterator[tuple[Checkpoint, dict]]:
    """Open the checkpoint to export, writing a random one for `--preset`; yields it with the
    manifest's `source` record (how validation finds the same weights again). A checkpoint's
    `files` are filled in by `build`, from the digests of the tensors its export reads."""
    if (checkpoint is None) == (preset_name is None):
        raise MixexportError("give either a CHECKPOINT directory or --preset NAME")
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint, allow_non_finite=allow_non_finite)
        yield ckpt, {"kind": "checkpoint", "path": str(ckpt.path.resolve()), "files": None}
        return
    config = preset(preset_name).replace(**overrides)
    with tempfile.TemporaryDirectory(prefix="mixexport-preset-") as tmp:
        progress(f"writing a random {preset_name} checkpoint (seed {seed})")
        path = write_checkpoint(Path(tmp) / "checkpoint", config, seed=seed)
        yield Checkpoint(path), {"kind": "preset", "preset": preset_name, "seed": seed,
                                 "config": config.to_hf_dict()}


def dynamic_ranges(options: BuildOptions, config: MixtralConfig) -> dict[str, list[int]]:
    """The ranges of the graphs' dynamic dimensions, defaults derived from the model's context."""
    total = options.max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    sequence = options.max_sequence or min(DEFAULT_MAX_SEQUENCE, total)
    if sequence > total:
        raise MixexportError(f"--max-sequence {sequence} exceeds the context length {total} "
                             f"(--max-context, default min(max_position_embeddings, {DEFAULT_MAX_CONTEXT}))")
    return {graph_io.BATCH: [1, options.max_batch], graph_io.SEQUENCE: [1, sequence],
            graph_io.PAST: [0, total - 1], graph_io.TOTAL: [1, total]}


def weight_bytes(ckpt: Checkpoint, dtype: str, quant: QuantScheme | None = None) -> int:
    """Bytes of the model's weights in `dtype` (experts stored as `quant` says, when given): what
    each target's external data file holds."""
    c = ckpt.config
    item = torch_dtype(dtype).itemsize
    total = weight_count(c) * item
    if quant is None:
        return total
    h, i, per_layer = c.hidden_size, c.intermediate_size, c.num_hidden_layers * c.num_local_experts
    experts = per_layer * 3 * h * i
    scales = per_layer * (2 * i * h // quant.group(h) + h * i // quant.group(i))
    return total - experts * item + experts * quant.bits // 8 + scales * item


def _check_resources(ckpt: Checkpoint, dtype: str, targets: tuple[str, ...], out: Path, validate: bool,
                     validation_mode: str, progress: Progress, quant: QuantScheme | None = None) -> None:
    """Say what the build will need, and refuse up front what cannot fit (not after an hour)."""
    per_target = weight_bytes(ckpt, dtype, quant)
    need = per_target * len(targets) + 64 * 1024**2
    free = shutil.disk_usage(out.parent).free
    minutes = per_target * len(targets) / ESTIMATE_WRITE_BYTES_PER_S / 60
    progress(f"writing {len(targets)} target(s) of {format_bytes(per_target)} each to {out} "
             f"({format_bytes(free)} free there; estimate: about {max(minutes, 0.1):.1f} min at the "
             f"{ESTIMATE_WRITE_BYTES_PER_S / 1e6:.0f} MB/s a 2-core machine writes)")
    if need > free:
        raise MixexportError(f"not enough disk space for {out}: {len(targets)} target(s) need about "
                             f"{format_bytes(need)}, {format_bytes(free)} are free on the filesystem of {out.parent}")
    if validate:
        # The reference is full precision also for quantized experts (and dequantizes one
        # layer's experts per call), so the estimate is the full-precision model's.
        ram = whole_validation_bytes(ckpt.config, dtype)
        available = memory_available()
        progress(f"whole-model validation would hold about {format_bytes(ram)} in memory"
                 + (f" ({format_bytes(available)} available)" if available is not None else "")
                 + f"; validation mode {validation_mode}")
        if validation_mode == "whole" and available is not None and ram > available:
            raise MixexportError(
                f"validating this model in memory needs about {format_bytes(ram)} of RAM (the PyTorch reference "
                f"plus one onnxruntime session), {format_bytes(available)} are available: use --validation-mode "
                f"streamed (one layer at a time), or build with --no-validate here and validate on a machine with "
                f"more memory")


def build(ckpt: Checkpoint, source: dict, out: str | Path, options: BuildOptions, progress: Progress) -> Manifest:
    """Build every requested target into OUT.

    Returns:
        the manifest (with the validation summary when validation ran).

    Raises:
        MixexportError: for an OUT that must not be written, an unsupported target or dtype, too
            little disk or memory, a parity failure, nothing compared, or (unless
            `allow_not_validated`) a target that could not be validated here; in the last two cases
            OUT has been written.
    """
    out = Path(out)
    config = ckpt.config
    dtype = resolve_dtype(config, options.dtype, progress)
    quant = options.experts_quant
    if quant is not None and (reason := quant.refusal(config.hidden_size, config.intermediate_size)):
        raise MixexportError(f"--experts-quant: {reason}")
    targets = resolve_targets(options.targets, config, dtype, progress, quant)
    layouts = resolve_kv_layouts(options.kv_layout, targets, options.targets is not None, config, progress)
    check_stage_options(options.stages, config.num_hidden_layers, quant is not None)
    check_moe_library(options, targets, dtype, progress)
    if options.stages and options.stages > 1 and any(kv.name == "shared" for kv in layouts.values()):
        raise MixexportError(f"--stages {options.stages} with --kv-layout shared is not supported: stage graphs and "
                             f"their validation follow the concat KV contract")
    ranges = dynamic_ranges(options, config)
    if any(kv.name == "shared" for kv in layouts.values()):
        ranges[graph_io.KV_BUFFER] = [1, ranges[graph_io.TOTAL][1]]  # the run's max_length in genai
    protected = {"the checkpoint": ckpt.path}
    check_destination(out, options.force, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        check_destination(out, options.force, protected)  # again, now that no other build can change it
        collect_stale(out, progress)
        _check_resources(ckpt, dtype, targets, out, options.validate, options.validation_mode, progress, quant)
        staging = make_staging(out)
        try:
            manifest = _build_into(staging, ckpt, source, out, layouts, dtype, ranges, options, progress)
            report = None
            if options.validate:
                # the library the user named, as copied into the artifact (its sha256 recorded)
                library = staging / "ort" / moe_library.LIBRARY_FILE if options.ort_moe_library else None
                report = validate_artifact(staging, manifest, ckpt, progress=progress, mode=options.validation_mode,
                                           quant_thresholds=options.quant_thresholds, ort_moe_library=library)
                manifest.validation = report["summary"]
                write_manifest(staging, manifest)
                if report["summary"]["failed_targets"]:
                    kept = keep_failed(staging, out)
                    raise MixexportError(f"parity validation failed ({report['summary']['failed_targets']}); the "
                                         f"artifact was kept for inspection in {kept}, {out} was not touched")
            install(staging, out, replace=options.force)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when installed or kept
    not_validated = report["summary"]["not_validated"] if report else []
    if not_validated:
        reasons = "; ".join(f"{t}: {report['targets'][t]['reason']}" for t in not_validated)
        if not report["summary"]["compared"]:
            # A gate that compared nothing has not passed, whatever the user accepts.
            raise NotValidatedError(f"{out} was written, but nothing could be compared on this machine ({reasons}); "
                                    f"validate it where its targets run, or build with --no-validate to skip the "
                                    f"gate knowingly", manifest)
        if not options.allow_not_validated:
            raise NotValidatedError(f"{out} was written, but {', '.join(not_validated)} could not be validated on "
                                    f"this machine ({reasons}); the others passed. Validate where they run, or pass "
                                    f"--allow-not-validated to accept this", manifest)
        progress(f"NOT validated (accepted with --allow-not-validated): {', '.join(not_validated)}")
    return manifest


class NotValidatedError(MixexportError):
    """The artifact was installed, but some of its targets could not be compared on this machine."""

    def __init__(self, message: str, manifest: Manifest) -> None:
        super().__init__(message)
        self.manifest = manifest


def _build_into(root: Path, ckpt: Checkpoint, source: dict, out: Path, layouts: dict[str, graph_io.KvLayout], dtype: str,
                ranges: dict[str, list[int]], options: BuildOptions, progress: Progress) -> Manifest:
    """Capture once, lower and write every target (`layouts`: target -> its KV layout) into `root`;
    returns the manifest (written)."""
    config = ckpt.config
    start = time.perf_counter()
    progress(f"capturing the decoder ({config.num_hidden_layers} layers, {dtype})")
    captured = capture_decoder(config, dtype, max_batch=ranges[graph_io.BATCH][1],
                               max_sequence=ranges[graph_io.SEQUENCE][1], max_total=ranges[graph_io.TOTAL][1])
    attach_checkpoint_weights(captured, ckpt, dtype)
    progress(f"captured in {time.perf_counter() - start:.1f}s")
    quant = options.experts_quant
    if quant is not None:
        progress(f"experts quantized {quant.name} while they are written (attention, router, embeddings stay {dtype})")
    stages = options.stages if options.stages and options.stages > 1 else None
    entries = {target: _build_target(captured, target, config, dtype, root, progress, quant, kv, stages,
                                     options.ort_provider, target == "ort" and options.ort_moe_library is not None)
               for target, kv in layouts.items()}
    if source["kind"] == "checkpoint":
        # Every weight was read (and hashed) by the export; nothing is read a second time.
        source = {**source, "files": checkpoint_entries(ckpt)}
    manifest = Manifest(model=config.summary(), dtype=dtype, source=source, dynamic_dims=ranges, targets=entries,
                        experts_quant=None if quant is None else quant.to_json())
    for target in layouts:
        BACKENDS[target].finish(root, out, manifest, options, lambda path: file_entry(path, root), progress,
                                checkpoint=ckpt.path)
    write_manifest(root, manifest)
    return manifest


def _build_target(captured: ir.Model, target: str, config: MixtralConfig, dtype: str, root: Path,
                  progress: Progress, quant: QuantScheme | None = None,
                  kv: graph_io.KvLayout = graph_io.CONCAT, stages: int | None = None,
                  provider: str | None = None, library: bool = False) -> TargetRecord:
    start = time.perf_counter()
    model = captured.clone()
    rewrites = BACKENDS[target].lower(model, config.num_hidden_layers, quant, kv, provider, library)
    folder = root / target
    folder.mkdir()
    chain = None
    if stages is None:
        files = save_model(model, folder, root, target, progress)
    else:
        cut = balanced_stages(part_bytes(model, config.num_hidden_layers), stages)
        progress(f"{target}: writing {stages} stage graphs: {', '.join(s.name for s in cut)}")
        files, chain = save_stages(model, cut, config, dtype, root, target, progress)
    progress(f"{target}: {config.num_hidden_layers} MoE nodes lowered, {sum(f['bytes'] for f in files) / 1e6:.1f} MB "
             f"written in {time.perf_counter() - start:.1f}s")
    return TargetRecord(dtype=dtype, files=files, onnx=f"{target}/{ONNX_FILE}",
                        inputs=[b.as_dict() for b in graph_io.inputs(config, dtype, kv.name)],
                        outputs=[b.as_dict() for b in graph_io.outputs(config, dtype, kv.name)],
                        moe_op=BACKENDS[target].moe_op_for(quant, provider, library), moe_nodes=rewrites[f"lower_moe_{target}"], passes=rewrites,
                        stages=chain,
                        # recorded by the targets that have more than one layout
                        extra={graph_io.KV_LAYOUT_FIELD: kv.name} if len(BACKENDS[target].kv_layouts) > 1 else {})
