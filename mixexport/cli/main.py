"""`mixexport` command line.

User errors (`MixexportError`) print one line on stderr and exit 1; `--verbose` adds the traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time
import traceback

import click

from mixexport import __version__
from mixexport.dtypes import CHOICES as DTYPE_CHOICES
from mixexport.dtypes import canonical_dtype
from mixexport.errors import MixexportError


def progress(message: str) -> None:
    """One line of progress on stderr (stdout stays for results)."""
    click.echo(f"[mixexport] {message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MixexportError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


def dtype_option(help_text: str, default=None):
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES, case_sensitive=False), default=default,
                        callback=lambda ctx, param, value: value and canonical_dtype(value), help=help_text)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mixexport")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Export Mixtral-family MoE checkpoints to ONNX and TensorRT, and validate their parity."""
    ctx.obj = {"verbose": verbose}


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              help="Model shapes: tiny, small, mixtral-8x7b, mixtral-8x22b.")
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
    start = time.perf_counter()
    progress(f"writing {preset_name} checkpoint ({config.num_hidden_layers} layers, {config.num_local_experts} "
             f"experts, top-{config.num_experts_per_tok}, {config.dtype}) to {out}")
    write_checkpoint(out, config, seed=seed, max_shard_size=parse_size(max_shard_size), progress=progress)
    click.echo(f"wrote {out} in {time.perf_counter() - start:.1f}s")


def main() -> None:
    cli(prog_name="mixexport")


if __name__ == "__main__":
    sys.exit(main())
