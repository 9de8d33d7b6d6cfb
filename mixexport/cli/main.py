"""`mixexport` command line.

User errors (`MixexportError`) print one line on stderr and exit 1; `--verbose` adds the traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import click

from mixexport import __version__
from mixexport.checkpoint.config import PRESETS
from mixexport.dtypes import CHOICES as DTYPE_CHOICES
from mixexport.dtypes import canonical_dtype
from mixexport.errors import MixexportError


def progress(message: str) -> None:
    """One line of progress on stderr (stdout stays for results)."""
    click.echo(f"[mixexport] {message}", err=True)


class _Group(click.Group):
    def main(self, *args, **kwargs):
        # A bad option value is a user error like any other: one line, exit status 1 (click's own
        # default is a usage block and status 2).
        try:
            super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.ClickException as exc:
            command = f" {exc.ctx.command_path} --help" if getattr(exc, "ctx", None) else " mixexport --help"
            click.echo(f"error: {exc.format_message()} (see{command})", err=True)
            sys.exit(1)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)

    def invoke(self, ctx: click.Context):
        # SIGTERM (a CI job cancelled, `kill`) unwinds like Ctrl-C, so every `finally` that removes
        # this run's staging files runs.
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except MixexportError as exc:
            _fail(ctx, str(exc))
        except OSError as exc:  # the machine's doing (full disk, read-only or missing path), not a bug
            _fail(ctx, _os_error_message(exc))
        except MemoryError:
            _fail(ctx, "out of memory; see the memory estimate printed at the start, or use a machine with more RAM")
        except _Terminated:
            _fail(ctx, "terminated (SIGTERM); files this run was writing were removed", status=128 + signal.SIGTERM)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted; files this run was writing were removed", status=130)


class _Terminated(KeyboardInterrupt):
    pass


def _terminate(signum, frame):
    raise _Terminated()


def _fail(ctx: click.Context, message: str, status: int = 1):
    if ctx.obj and ctx.obj.get("verbose"):
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(status)


_OS_HINTS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "the filesystem is read-only; write elsewhere",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.ENAMETOOLONG: "use a shorter path"}


def _os_error_message(exc: OSError) -> str:
    what = os.strerror(exc.errno) if exc.errno else str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    hint = _OS_HINTS.get(exc.errno)
    return f"{where}{what}" + (f" ({hint})" if hint and hint.lower() != what.lower() else "")


def quant_threshold_options(command):
    """--quant-min-top1, --quant-min-router, --quant-max-logits-error: the gates of a quantized
    artifact's quantization error (mixexport.validate.quant_parity; default: per bit width)."""
    for name, help_text in reversed((
            ("--quant-min-top1", "Quantized experts: least share of positions whose argmax token matches the "
                                 "full-precision reference's (default: 0.9 for int8, 0.75 for int4)."),
            ("--quant-min-router", "Quantized experts: least share of (token, layer) whose top-k experts match the "
                                   "full-precision reference's (default: 0.9 for int8, 0.8 for int4)."),
            ("--quant-max-logits-error", "Quantized experts: largest RMS logits error relative to the full-precision "
                                         "reference's RMS (default: 0.05 for int8, 0.15 for int4)."))):
        command = click.option(name, type=click.FloatRange(min=0.0), help=help_text)(command)
    return command


def quant_thresholds(quant_min_top1, quant_min_router, quant_max_logits_error):
    from mixexport.validate.quant_parity import QuantThresholds

    return QuantThresholds(quant_min_top1, quant_min_router, quant_max_logits_error)


def dtype_option(help_text: str, default=None):
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES, case_sensitive=False), default=default,
                        callback=lambda ctx, param, value: value and canonical_dtype(value), help=help_text)


# build and validate: how parity is checked (validate.streamed.choose_mode says which in the output).
VALIDATION_MODE = click.option(
    "--validation-mode", type=click.Choice(["auto", "whole", "streamed"]), default="auto", show_default=True,
    help="whole: the reference and each target graph in memory at once; streamed: one decoder layer at a time "
         "(about one layer's weights in memory); auto: streamed when the whole model does not fit.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mixexport")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Export Mixtral-family MoE checkpoints to ONNX and TensorRT, and validate their parity."""
    ctx.obj = {"verbose": verbose}


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--preset", "preset_name", default="tiny", show_default=True, type=click.Choice(list(PRESETS)),
              help="Model shapes.")
@click.option("--layers", type=click.IntRange(min=1), help="Override the number of decoder layers.")
@click.option("--experts", type=click.IntRange(min=1), help="Override the number of experts E.")
@click.option("--top-k", type=click.IntRange(min=1), help="Override the experts per token K.")
@dtype_option("Weights dtype (default: the preset's).")
@click.option("--seed", default=0, show_default=True, help="Random seed; same preset + seed = same weights.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
def init(out, preset_name, layers, experts, top_k, dtype, seed, max_shard_size) -> None:
    """Write a random-weight checkpoint in Hugging Face layout to OUT."""
    from mixexport.checkpoint.config import preset
    from mixexport.checkpoint.writer import parse_size, write_checkpoint

    config = preset(preset_name)
    overrides = {"num_hidden_layers": layers, "num_local_experts": experts, "num_experts_per_tok": top_k,
                 "dtype": dtype}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if experts is not None and top_k is None:
        overrides["num_experts_per_tok"] = min(config.num_experts_per_tok, experts)
    config = config.replace(**overrides)
    shard_bytes = parse_size(max_shard_size)
    start = time.perf_counter()
    progress(f"writing {preset_name} checkpoint ({config.num_hidden_layers} layers, {config.num_local_experts} "
             f"experts, top-{config.num_experts_per_tok}, {config.dtype}) to {out}")
    write_checkpoint(out, config, seed=seed, max_shard_size=shard_bytes, progress=progress)
    click.echo(f"wrote {out} in {time.perf_counter() - start:.1f}s")


@cli.command()
@click.argument("checkpoint", required=False, type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@click.option("--preset", "preset_name", type=click.Choice(list(PRESETS)),
              help="Build a random checkpoint of this preset instead of CHECKPOINT.")
@click.option("--seed", default=0, show_default=True, help="Weights seed for --preset.")
@click.option("--target", "targets",
              help="Comma-separated targets: portable, ort, trt (default: every target that can serve the model "
                   "in the build's dtype; the others are named with the reason).")
@dtype_option("Graph dtype (default: the checkpoint's; a bfloat16 checkpoint builds float16).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1, max=2**31 - 1),
              help="Largest batch.")
@click.option("--max-sequence", type=click.IntRange(min=1, max=2**31 - 1),
              help="Most new tokens per call (prefill length; default: min(2048, the context length)).")
@click.option("--max-context", type=click.IntRange(min=1, max=2**31 - 1),
              help="Most past + new tokens (default: max_position_embeddings, at most 8192).")
@click.option("--no-validate", is_flag=True, help="Skip the parity check against the PyTorch reference.")
@click.option("--allow-not-validated", is_flag=True,
              help="Exit 0 even when a target could not be validated on this machine (failures still exit 1).")
@click.option("--allow-non-finite", is_flag=True,
              help="Export weights that hold NaN or Inf (refused by default, naming the tensor).")
@VALIDATION_MODE
@click.option("--force", is_flag=True,
              help="Replace an existing OUT that is a mixexport artifact (only once the new build succeeded).")
@click.option("--plugin", type=click.Path(dir_okay=False),
              help="MixtralMoE plugin library for the trt engine (default: $MIXEXPORT_PLUGIN_LIB or "
                   "build/plugins/moe/libmixexport_plugins.so).")
@click.option("--experts-quant", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Weight-only quantized experts: int8 per output row, int4 per row and group of --group-size "
                   "columns (symmetric; attention, router, embeddings stay in the graph dtype).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), help="int4 columns per scale (default 32).")
@click.option("--ort-provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider the ort graph is for: cpu runs each chosen expert's MatMuls on "
                   "all threads (standard ops, one If per expert), cuda keeps one fused MoE/QMoE node per layer.")
@click.option("--stages", type=click.IntRange(min=1, max=2**31 - 1),
              help="Also write each target as a chain of N stage graphs over contiguous layer ranges balanced by "
                   "bytes (pipeline parallel: one per GPU); 1 or unset: the whole graph only.")
@quant_threshold_options
@click.option("--kv-layout", type=click.Choice(["concat", "shared"]), default="concat", show_default=True,
              help="KV cache of the ort graph: concat (present = past + new keys) or shared (static buffers "
                   "updated in place by com.microsoft.GroupQueryAttention, for onnxruntime-genai's "
                   "past_present_share_buffer and CUDA graphs; rows packed at the front, no left padding).")
@click.option("--ort-moe-library", type=click.Path(dir_okay=False),
              help="The CPU MoE op library built from plugins/ort_moe: the ort graph's MoE becomes one "
                   "mixexport.ort.MoE node per layer that splits every chosen expert over all threads "
                   "(float32, --ort-provider cpu); copied into OUT/ort and named in genai_config.json.")
def build(checkpoint, out, preset_name, seed, targets, dtype, max_batch, max_sequence, max_context, no_validate,
          allow_not_validated, allow_non_finite, validation_mode, force, plugin, experts_quant, group_size,
          ort_provider, stages, quant_min_top1, quant_min_router, quant_max_logits_error, kv_layout,
          ort_moe_library) -> None:
    """Export CHECKPOINT (or --preset) to ONNX for every target, then validate parity."""
    from mixexport.driver.build import BuildOptions, NotValidatedError, build as run_build, reference_source
    from mixexport.artifact.install import check_destination
    from mixexport.quant import parse_scheme

    options = BuildOptions(targets=None if targets is None else tuple(t.strip() for t in targets.split(",")
                                                                      if t.strip()),
                           dtype=dtype, max_batch=max_batch, max_sequence=max_sequence, max_context=max_context,
                           force=force, validate=not no_validate, allow_not_validated=allow_not_validated,
                           validation_mode=validation_mode, plugin=plugin,
                           experts_quant=parse_scheme(experts_quant, group_size and int(group_size)),
                           ort_provider=ort_provider,
                           quant_thresholds=quant_thresholds(quant_min_top1, quant_min_router,
                                                             quant_max_logits_error),
                           stages=stages, kv_layout=kv_layout,
                           ort_moe_library=Path(ort_moe_library) if ort_moe_library else None)
    # Before any slow step (build checks again, under OUT's lock).
    check_destination(Path(out), force, {"the checkpoint": Path(checkpoint)} if checkpoint else {})
    start = time.perf_counter()
    with reference_source(checkpoint, preset_name, seed, {}, progress, allow_non_finite) as (ckpt, source):
        try:
            manifest = run_build(ckpt, source, out, options, progress)
        except NotValidatedError as exc:
            _print_build_summary(out, exc.manifest, time.perf_counter() - start)
            raise
    _print_build_summary(out, manifest, time.perf_counter() - start)


def _print_build_summary(out, manifest, seconds) -> None:
    validation = manifest.validation
    rows = [("target", "moe op", "MoE nodes", "size MB", "parity", "router agreement")]
    for target, entry in manifest.targets.items():
        status = validation["targets"].get(target, "-") if validation else "not run (--no-validate)"
        agreement = validation["router_agreement"].get(target) if validation else None
        rows.append((target, entry.moe_op or "standard ONNX", str(entry.moe_nodes),
                     f"{sum(f['bytes'] for f in entry.files) / 1e6:.1f}", status,
                     "-" if agreement is None else f"{agreement:.1%}"))
    _print_table(rows)
    engine = manifest.targets["trt"].extra.get("engine") if "trt" in manifest.targets else None
    if engine and engine.get("status") == "not built":
        click.echo(f"trt engine: not built here (missing {engine['missing']}); build it on a GPU machine as shown "
                   f"above")
    click.echo(f"built {out} ({manifest.dtype}) in {seconds:.1f}s")


def _print_table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


@cli.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--plugin", type=click.Path(dir_okay=False),
              help="MixtralMoE plugin library (default: $MIXEXPORT_PLUGIN_LIB or build/plugins/moe/).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=str(Path.home() / ".cache" / "mixexport" /
              "tensorrt.timing.cache"), show_default=True,
              help="TensorRT timing cache, reused across builds: one file per GPU model and TensorRT version is "
                   "kept beside this path (e.g. tensorrt.timing-trt10.8.0-nvidia-h200-sm90.cache).")
def engine(out, plugin, timing_cache) -> None:
    """Build OUT/trt/model.engine (needs TensorRT >= 10, an NVIDIA GPU and the plugin library)."""
    from mixexport.artifact.install import output_lock
    from mixexport.artifact.manifest import file_entry, read_manifest, write_manifest
    from mixexport.targets.trt.engine import build_engine

    root = Path(out)
    with output_lock(root):  # not while a build replaces OUT
        manifest = read_manifest(root)
        if "trt" not in manifest.targets:
            raise MixexportError(f"{out} has no trt target; rebuild with --target trt")
        start = time.perf_counter()
        manifest.targets["trt"].extra["engine"] = build_engine(root, manifest, lambda path: file_entry(path, root),
                                                               plugin, timing_cache, progress)
        manifest.validation = None  # the engine has not been validated yet
        write_manifest(root, manifest)
    click.echo(f"wrote {root / 'trt' / 'model.engine'} in {time.perf_counter() - start:.1f}s; "
               f"check it with: mixexport validate {out}")


ORT_MOE_LIBRARY = click.option(
    "--ort-moe-library", type=click.Path(dir_okay=False),
    help="Load this MoE op library for an ort graph built with --ort-moe-library (e.g. OUT/ort/"
         "libmixexport_ort_moe.so): native code from an artifact is loaded only when named.")


@cli.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", type=click.Path(file_okay=False),
              help="Reference checkpoint, if it moved since the build (its files must be unchanged).")
@click.option("--report", type=click.Path(dir_okay=False), help="Also write the JSON report here.")
@click.option("--allow-not-validated", is_flag=True,
              help="Exit 0 when the targets that could not be run here (e.g. bfloat16 on CPU, an engine without a "
                   "GPU) are the only ones not passed; a failed target or comparing nothing still exits 1.")
@click.option("--allow-non-finite", is_flag=True,
              help="Read reference weights that hold NaN or Inf (an artifact built with --allow-non-finite).")
@VALIDATION_MODE
@quant_threshold_options
@ORT_MOE_LIBRARY
def validate(out, checkpoint, report, allow_not_validated, allow_non_finite, validation_mode, quant_min_top1,
             quant_min_router, quant_max_logits_error, ort_moe_library) -> None:
    """Check every target in OUT against the PyTorch reference; exit 1 unless every one passed."""
    from mixexport.validate.parity import validate_out

    result, written = validate_out(out, checkpoint, report, progress, allow_non_finite=allow_non_finite,
                                   mode=validation_mode,
                                   quant_thresholds=quant_thresholds(quant_min_top1, quant_min_router,
                                                                     quant_max_logits_error),
                                   ort_moe_library=ort_moe_library)
    rows = [("target", "status", "max |diff| logits", "max |diff| present", "router agreement", "why")]
    for target, r in result["targets"].items():
        diffs = r.get("max_abs_diff", {})
        rows.append((target, r["status"], _diff(diffs, "logits"), _diff(diffs, "present"),
                     "-" if r.get("router_agreement") is None else f"{r['router_agreement']:.1%}", _why(r)))
    _print_table(rows)
    if "experts_quant" in result:
        click.echo(f"quantization error ({result['experts_quant']['scheme']} experts, against the full-precision "
                   f"reference; gates {result['experts_quant']['thresholds']}):")
        _print_quant_rows(result)
    if written:
        click.echo("report: " + " and ".join(str(p) for p in written))
    summary = result["summary"]
    if summary["failed_targets"]:
        raise MixexportError(f"parity failed for {', '.join(summary['failed_targets'])} "
                             f"(tolerances {result['dtype']}: see the report)")
    if summary["compared"] == 0:
        raise MixexportError(f"{out}: {result['reason']}" + (
            f" (not validated: {', '.join(summary['not_validated'])})" if summary["not_validated"] else "") +
            "; a gate that compared nothing has not passed")
    if summary["not_validated"] and not allow_not_validated:
        raise MixexportError(f"not validated here: {', '.join(summary['not_validated'])} (see the table); pass "
                             f"--allow-not-validated to accept the targets that passed")


def _print_quant_rows(result: dict) -> None:
    rows = [("target", "top-1 agreement", "router agreement", "logits RMS rel. error", "max |diff| logits", "failed")]
    for target, r in result["targets"].items():
        q = r.get("quantization")
        if q:
            rows.append((target, f"{q['top1_agreement']:.1%}", "-" if q["router_agreement"] is None
                         else f"{q['router_agreement']:.1%}", f"{q['logits_rel_error']:.3f}",
                         f"{q['logits_max_abs_error']:.2e}", ", ".join(q["failed"]) or "-"))
    _print_table(rows)


def _diff(diffs: dict, group: str) -> str:
    if group not in diffs:
        return "-"
    return "non-finite" if diffs[group] is None else f"{diffs[group]:.2e}"


def _why(result: dict) -> str:
    """The validate table's last column: why a target is not validated or failed."""
    if result.get("failed_outputs"):
        shown = result["failed_outputs"][:3]
        return "outside tolerance: " + ", ".join(shown) + (" ..." if len(result["failed_outputs"]) > 3 else "")
    if result.get("quantization") and result["quantization"]["failed"]:
        return "quantization error: " + ", ".join(result["quantization"]["failed"])
    if result["status"] == "fail" and result.get("router_agreement") is not None and "reason" not in result:
        return "router agreement too low"
    return result.get("reason", "")


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--target", type=click.Choice(["ort", "portable"]), help="Graph to run (default: ort where present).")
@click.option("--prompt", help="Prompt text (tokenized with the artifact's tokenizer.json).")
@click.option("--ids", help="Prompt token ids instead, e.g. 1,2,3 (the new ids are printed).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1, max=2**31 - 1))
@click.option("--temperature", type=float, help="Sample at this temperature (default: greedy).")
@click.option("--top-k", type=int, help="Sample from the K most likely tokens.")
@click.option("--top-p", type=float, help="Sample from the smallest set of tokens holding this probability.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0, max=2**63 - 1),
              help="Sampling seed.")
@click.option("--runtime", type=click.Choice(["auto", "genai", "onnxruntime"]), default="auto", show_default=True,
              help="onnxruntime-genai (auto: where installed) or the plain onnxruntime loop.")
@ORT_MOE_LIBRARY
def generate(out, target, prompt, ids, max_new_tokens, temperature, top_k, top_p, seed, runtime,
             ort_moe_library) -> None:
    """Generate tokens from OUT's ort or portable graph, streamed as they come; prints tokens/s."""
    from mixexport.runtime.generate import Sampling, run

    result = run(out, target, prompt, ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed), runtime,
                 lambda text: click.echo(text, nl=False), ort_moe_library)
    click.echo()
    progress(result.summary())


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
def inspect(path, as_json) -> None:
    """Describe an artifact directory or an ONNX file: ops, MoE nodes, bindings."""
    from mixexport.artifact.inspect import inspect_path

    info = inspect_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if "manifest" in info:
        m = info["manifest"]
        model = m["model"]
        click.echo(f"model: {model['num_hidden_layers']} layers, H {model['hidden_size']}, I {model['intermediate_size']}, "
                   f"E {model['num_local_experts']}, top-{model['num_experts_per_tok']}, dtype {m['dtype']}")
        click.echo(f"source: {m['source'].get('path') or m['source'].get('preset')}")
        click.echo("dynamic dims: " + ", ".join(f"{k} {v[0]}..{v[1]}" for k, v in m["dynamic_dims"].items()))
        quant = info["experts_quant"]
        click.echo("experts: " + ("in the model dtype" if quant is None else
                                  f"int{quant['bits']} weight-only, " + (f"group {quant['group_size']}" if quant["group_size"]
                                                                          else "per output row") + f" ({quant['storage']})"))
        if info["validation"]:
            click.echo(f"validation: {'passed' if info['validation']['passed'] else 'FAILED'} "
                       f"{info['validation']['targets']}")
    for target, t in info["targets"].items():
        click.echo(f"\n[{target}] {t['path']}: {t['nodes']} nodes, {t['moe_nodes']} MoE nodes, "
                   f"{t['initializers']} initializers, opsets {t['opsets']}"
                   + (f", KV layout {t['kv_layout']}" if "kv_layout" in t else ""))
        click.echo("  ops: " + ", ".join(f"{op} {n}" for op, n in t["ops"].items()))
        for kind in ("inputs", "outputs"):
            shown = t[kind][:5]
            more = len(t[kind]) - len(shown)
            click.echo(f"  {kind}: " + "; ".join(f"{b['name']} {b['dtype']}{b['shape']}" for b in shown)
                       + (f"; ... {more} more" if more > 0 else ""))
        for i, stage in enumerate(t.get("stages", [])):
            fed = ", ".join(f"{a} -> {b}" for a, b in stage["next"].items())
            click.echo(f"  stage {i} {stage['name']}: {stage['onnx']}, {stage['nodes']} nodes, {stage['moe_nodes']} MoE "
                       f"nodes, {len(stage['inputs'])} inputs, {len(stage['outputs'])} outputs"
                       + (f"; feeds the next stage {fed}" if fed else ""))


def main() -> None:
    cli(prog_name="mixexport")


if __name__ == "__main__":
    sys.exit(main())
