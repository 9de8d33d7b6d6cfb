"""Ahead-of-time build of the MoE kernels for the TensorRT plugin: cubin + PTX + JSON per variant.

    python -m mixexport.kernels.aot --arch 80,86,89,90 --dtype fp16,bf16 [--quant none,int8,int4-g32] -o DIR

No GPU is needed: triton compiles for a named target. The metadata format is described in README.md
beside this file; it carries what a driver-API launcher needs (parameter order and types, how to
bind each one, grid formula, threads, shared memory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import click

from mixexport.dtypes import DTYPES as GRAPH_DTYPES
from mixexport.errors import MixexportError
from mixexport.kernels import require_triton
from mixexport.kernels.configs import (SHAPE_MULTIPLE, AOT_MAX_EXPERTS, AOT_NUM_WARPS, ALIGN_BLOCK_C, ALIGN_BLOCK_S, ARCHS, GEMM_TILES,
                                       GRIDS, REDUCE_BLOCK_H, ROUTING_BLOCK_T, SHARED_MEMORY_LIMIT, TILE_RULE,
                                       WORKSPACE, quant_constexprs, substitute)
from mixexport.quant import INT4_GROUP_SIZES, QuantScheme

# /2: every variant records the ptxas that made it and the CUDA driver it needs (`toolkit`).
# /3: GEMM variants per expert weight scheme (`quant`); a tile may have several of them.
FORMAT = "mixexport-moe-kernels/3"
# --dtype takes the short or the canonical name of a graph dtype.
DTYPES = {**{d.short: d.short for d in GRAPH_DTYPES.values()}, **{d.name: d.short for d in GRAPH_DTYPES.values()}}
# --quant: the expert weights the GEMM variants read ("none": the activation dtype), by scheme name.
QUANT_SCHEMES = {"none": None, **{s.name: s for s in [QuantScheme(8), *(QuantScheme(4, g) for g in INT4_GROUP_SIZES)]}}
# The two pointers every compiled triton kernel takes after its own parameters.
SCRATCH_PARAMS = ("global_scratch", "profile_scratch")
# Parameters whose values the kernels assume are multiples of 16 (triton's `tt.divisibility`): it lets
# loads along H and I vectorize, which the weight stream needs. Pointers get it too (allocations are
# 256-byte aligned).
DIVISIBLE_INTS = {"H", "I"}
C_TYPES = {"i32": "int32_t"}
# Triton reads the ptxas for sm_80..89 from TRITON_PTXAS_PATH and for sm_90+ from
# TRITON_PTXAS_BLACKWELL_PATH, and silently falls back to its bundled copy when the path does not run.
PTXAS_ENV = ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH")


def toolkit_requirements(ptxas_version: str, ptx: str) -> dict:
    """What a CUDA driver must support to load a variant, from the ptxas that compiled it.

    A cubin loads on any driver of the same CUDA major version or newer (CUDA's minor version
    compatibility: 12.x cubins on R525+, 13.x on R580+); PTX is JIT-compiled by the driver, which
    must know that PTX ISA, i.e. be at least the ptxas' own CUDA version.

    Args:
        ptxas_version: "13.4" (what `ptxas --version` says after "release").
        ptx: the variant's PTX text.

    Returns:
        {"ptxas_version", "ptx_isa", "cuda_for_cubin", "cuda_for_ptx"}, versions as "major.minor".
    """
    match = re.fullmatch(r"(\d+)\.(\d+)", ptxas_version)
    isa = re.search(r"^\.version\s+(\d+\.\d+)", ptx, re.M)
    if not match or not isa:
        raise MixexportError(f"cannot read the CUDA version of ptxas {ptxas_version!r} or the PTX ISA of its output")
    return {"ptxas_version": ptxas_version, "ptx_isa": isa.group(1), "cuda_for_cubin": f"{match.group(1)}.0",
            "cuda_for_ptx": ptxas_version}


@dataclasses.dataclass(frozen=True)
class Param:
    """One kernel parameter: its triton type (DT = the variant's dtype) and what a launcher binds to it."""

    name: str
    type: str
    bind: str  # "input:<name>", "output:<name>", "workspace:<name>" or an integer formula over N,H,I,E,K
    quantized: bool = False  # a parameter of the quantized GEMM variants only (the scales)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A kernel as the AOT build sees it."""

    module: str
    function: str
    params: tuple[Param, ...]
    grid: str
    per_dtype: bool  # False: one build per arch serves every dtype


KERNELS = {
    "routing": KernelSpec("mixexport.kernels.routing", "routing_kernel", (
        Param("logits_ptr", "*DT", "input:router_logits"), Param("weights_ptr", "*fp32", "workspace:topk_weights"),
        Param("ids_ptr", "*i32", "workspace:topk_ids"), Param("N", "i32", "N"), Param("E", "i32", "E"),
        Param("K", "i32", "K"), Param("normalize", "i32", "normalize")), GRIDS["routing"], True),
    "align_count": KernelSpec("mixexport.kernels.align", "align_count_kernel", (
        Param("topk_ids_ptr", "*i32", "workspace:topk_ids"), Param("chunk_counts_ptr", "*i32", "workspace:chunk_counts"),
        Param("num_slots", "i32", "N*K")), GRIDS["align_count"], False),
    "align_scatter": KernelSpec("mixexport.kernels.align", "align_scatter_kernel", (
        Param("topk_ids_ptr", "*i32", "workspace:topk_ids"), Param("chunk_counts_ptr", "*i32", "workspace:chunk_counts"),
        Param("sorted_ids_ptr", "*i32", "workspace:sorted_ids"), Param("expert_ids_ptr", "*i32", "workspace:expert_ids"),
        Param("num_slots", "i32", "N*K"), Param("E", "i32", "E"), Param("block_m", "i32", "BLOCK_M")),
        GRIDS["align_scatter"], False),
    "gate_up": KernelSpec("mixexport.kernels.grouped_gemm", "gate_up_kernel", (
        Param("x_ptr", "*DT", "input:x"), Param("w_ptr", "*WT", "input:w_gate_up"),
        Param("sorted_ids_ptr", "*i32", "workspace:sorted_ids"), Param("expert_ids_ptr", "*i32", "workspace:expert_ids"),
        Param("act_ptr", "*DT", "workspace:act"), Param("num_slots", "i32", "N*K"), Param("H", "i32", "H"),
        Param("I", "i32", "I"), Param("K", "i32", "K"), Param("s_ptr", "*DT", "input:s_gate_up", quantized=True)),
        GRIDS["gate_up"], True),
    "down": KernelSpec("mixexport.kernels.grouped_gemm", "down_kernel", (
        Param("act_ptr", "*DT", "workspace:act"), Param("w_ptr", "*WT", "input:w_down"),
        Param("sorted_ids_ptr", "*i32", "workspace:sorted_ids"), Param("expert_ids_ptr", "*i32", "workspace:expert_ids"),
        Param("topk_weights_ptr", "*fp32", "workspace:topk_weights"), Param("y_ptr", "*fp32", "workspace:y"),
        Param("num_slots", "i32", "N*K"), Param("H", "i32", "H"), Param("I", "i32", "I"),
        Param("s_ptr", "*DT", "input:s_down", quantized=True)), GRIDS["down"], True),
    "topk_reduce": KernelSpec("mixexport.kernels.reduce", "topk_reduce_kernel", (
        Param("y_ptr", "*fp32", "workspace:y"), Param("out_ptr", "*DT", "output:out"),
        Param("num_slots", "i32", "N*K"), Param("H", "i32", "H"), Param("K", "i32", "K"),
        Param("split_k", "i32", "SPLIT_K")), GRIDS["topk_reduce"], True),
}
# Launch order of one MoE forward.
PIPELINE = ("routing", "align_count", "align_scatter", "gate_up", "down", "topk_reduce")
GEMMS = ("gate_up", "down")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: a kernel at one architecture, dtype and tile."""

    kernel: str
    arch: int
    dtype: str | None
    tile_name: str | None
    constexprs: dict
    num_warps: int
    num_stages: int
    quant: str | None = None  # a GEMM's weight scheme (QUANT_SCHEMES), None: weights in the dtype

    @property
    def name(self) -> str:
        parts = [self.kernel, self.tile_name, self.dtype, self.quant and self.quant.replace("-", ""), f"sm{self.arch}"]
        return "_".join(p for p in parts if p)

    def params(self) -> list[Param]:
        """The runtime parameters of this variant: a 16-bit GEMM has no scales (s_ptr is a constexpr None)."""
        return [p for p in KERNELS[self.kernel].params if self.quant or not p.quantized]


def _small_kernel_constexprs(kernel: str) -> dict:
    return {
        "routing": {"BLOCK_T": ROUTING_BLOCK_T, "BLOCK_E": AOT_MAX_EXPERTS},
        "align_count": {"BLOCK_S": ALIGN_BLOCK_S, "BLOCK_E": AOT_MAX_EXPERTS},
        "align_scatter": {"BLOCK_S": ALIGN_BLOCK_S, "BLOCK_E": AOT_MAX_EXPERTS, "BLOCK_C": ALIGN_BLOCK_C},
        "topk_reduce": {"BLOCK_H": REDUCE_BLOCK_H},
    }[kernel]


def _gemm_constexprs(kernel: str, tile, quant: str | None) -> dict:
    scheme = QUANT_SCHEMES[quant or "none"]
    bits = quant_constexprs(0, None) if scheme is None else quant_constexprs(scheme.bits, scheme.group_size)
    # A 16-bit variant compiles the scale pointer away (a constexpr None: no parameter at all).
    return {**tile.constexprs(kernel), "UPCAST": False, **bits, **({} if scheme else {"s_ptr": None})}


def variants(archs: list[int], dtypes: list[str], quants: list[str] = ("none",)) -> list[Variant]:
    """Every kernel variant for the given architectures, dtypes and expert weight schemes.

    Args:
        archs: compute capabilities, e.g. [80, 90].
        dtypes: canonical short dtype names, e.g. ["fp16", "bf16"].
        quants: QUANT_SCHEMES names of the GEMMs' weights, e.g. ["none", "int8", "int4-g32"].

    Returns:
        The variants, in pipeline order per architecture.
    """
    out = []
    for arch in archs:
        for kernel in PIPELINE:
            spec = KERNELS[kernel]
            for dtype in (dtypes if spec.per_dtype else [None]):
                if kernel in GEMMS:
                    for quant in quants:
                        for tile_name, tile in GEMM_TILES[arch].items():
                            out.append(Variant(kernel, arch, dtype, tile_name, _gemm_constexprs(kernel, tile, quant),
                                               tile.num_warps, tile.num_stages, None if quant == "none" else quant))
                else:
                    out.append(Variant(kernel, arch, dtype, None, _small_kernel_constexprs(kernel), AOT_NUM_WARPS, 1))
    return out


def kernel_function(spec: KernelSpec):
    """The kernel object of a spec (a JITFunction, or an interpreted one under TRITON_INTERPRET=1)."""
    import importlib

    return getattr(importlib.import_module(spec.module), spec.function)


def compile_variant(variant: Variant, out_dir: Path) -> dict:
    """Compile one variant and write its cubin, PTX and metadata JSON.

    Args:
        variant: what to compile.
        out_dir: destination folder.

    Returns:
        The metadata written to `<variant.name>.json`.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    spec = KERNELS[variant.kernel]
    fn = kernel_function(spec)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise MixexportError("the AOT build compiles for GPUs; run it without TRITON_INTERPRET=1")
    spec_params = variant.params()
    # WT: the weights' element type (uint8 storage for quantized experts).
    weight_type = "u8" if variant.quant else variant.dtype or ""
    types = {p.name: p.type.replace("WT", weight_type).replace("DT", variant.dtype or "") for p in spec_params}
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    hinted = [i for i, p in enumerate(spec_params) if p.type.startswith("*") or p.name in DIVISIBLE_INTS]
    # Parameter indices count every kernel argument, constexprs included.
    attrs = {(fn.arg_names.index(spec_params[i].name),): [["tt.divisibility", SHAPE_MULTIPLE]] for i in hinted}
    source = ASTSource(fn=fn, signature=signature, constexprs=variant.constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", variant.arch, 32),
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages,
                                       "enable_fp_fusion": True})
    meta = compiled.metadata
    shared = meta.shared
    if shared > SHARED_MEMORY_LIMIT[variant.arch]:
        raise MixexportError(f"{variant.name} needs {shared} bytes of shared memory, more than sm_{variant.arch}'s "
                             f"{SHARED_MEMORY_LIMIT[variant.arch]}; shrink its tile in mixexport/kernels/configs.py")

    cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
    ptxas = get_ptxas(variant.arch)  # the one triton just ran for this arch
    (out_dir / f"{variant.name}.cubin").write_bytes(cubin)
    (out_dir / f"{variant.name}.ptx").write_text(ptx)
    params = [{"name": p.name, "type": types[p.name], "c_type": "CUdeviceptr" if p.type.startswith("*") else
               C_TYPES[p.type], "divisibility": SHAPE_MULTIPLE if p.type.startswith("*") or p.name in DIVISIBLE_INTS else 1,
               "bind": p.bind} for p in spec_params]
    # Triton's two trailing scratch pointers: null when their size is 0 (the launcher must still pass them).
    params += [{"name": name, "type": "*i8", "c_type": "CUdeviceptr", "divisibility": 1,
                "bind": f"scratch:{size}"} for name, size in
               zip(SCRATCH_PARAMS, (meta.global_scratch_size, meta.profile_scratch_size))]
    metadata = {
        "format": FORMAT,
        "name": variant.name,
        "kernel": variant.kernel,
        "function": spec.function,
        "entry": meta.name,
        "arch": variant.arch,
        "dtype": variant.dtype,
        "tile": variant.tile_name,
        "quant": _quant_json(variant.quant) if variant.kernel in GEMMS else None,  # the others read no weights
        "cubin": f"{variant.name}.cubin",
        "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
        "ptx": f"{variant.name}.ptx",
        "num_warps": variant.num_warps,
        "num_stages": variant.num_stages,
        "threads_per_block": variant.num_warps * 32,
        "shared_memory_bytes": shared,
        "global_scratch_bytes": meta.global_scratch_size,
        "profile_scratch_bytes": meta.profile_scratch_size,
        "constexprs": dict(variant.constexprs),
        "params": params,
        "grid": [substitute(spec.grid, variant.constexprs), "1", "1"],
        "triton_version": triton.__version__,
        "toolkit": {"ptxas": ptxas.path, **toolkit_requirements(ptxas.version, ptx)},
    }
    (out_dir / f"{variant.name}.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def _quant_json(quant: str | None) -> dict:
    """A GEMM variant's weights as the plugin contract spells them (quant_bits 0: the activation dtype)."""
    scheme = QUANT_SCHEMES[quant or "none"]
    return {"bits": 0, "group_size": 0} if scheme is None else {"bits": scheme.bits, "group_size": scheme.group_size or 0}


def use_ptxas(ptxas: Path, archs: list[int]) -> None:
    """Make triton compile every arch with this ptxas (e.g. a CUDA 12 one, for drivers older than R580).

    Args:
        ptxas: an executable `ptxas` of a CUDA toolkit.
        archs: the archs about to be compiled.

    Raises:
        MixexportError: when triton would not use it (triton falls back to its own ptxas silently).
    """
    from triton.backends.nvidia.compiler import get_ptxas, get_ptxas_version

    for name in PTXAS_ENV:
        os.environ[name] = str(ptxas)
    get_ptxas_version.cache_clear()
    for arch in archs:
        tool = get_ptxas(arch)
        if Path(tool.path).resolve() != ptxas.resolve():
            raise MixexportError(f"--ptxas {ptxas}: triton does not run it for sm_{arch} (it would use {tool.path}); "
                                 f"pass the path of a working ptxas executable")


def build(archs: list[int], dtypes: list[str], out_dir: Path, ptxas: Path | None = None,
          quants: list[str] = ("none",)) -> dict:
    """Compile every variant and write the index.

    Args:
        archs: compute capabilities, each in configs.ARCHS.
        dtypes: short dtype names (fp16, bf16, fp32).
        out_dir: destination folder, created if missing.
        ptxas: compile with this ptxas instead of triton's bundled one (see `use_ptxas`).
        quants: the expert weight schemes of the GEMM variants (QUANT_SCHEMES names).

    Returns:
        The index written to `index.json`.
    """
    require_triton()
    if ptxas is not None:
        use_ptxas(ptxas, archs)
    out_dir.mkdir(parents=True, exist_ok=True)
    built = [compile_variant(v, out_dir) for v in variants(archs, dtypes, quants)]
    index = {
        "format": FORMAT,
        "archs": archs,
        "dtypes": dtypes,
        "quants": [_quant_json(q) for q in quants],
        "max_experts": AOT_MAX_EXPERTS,
        "shape_multiple": SHAPE_MULTIPLE,
        "pipeline": list(PIPELINE),
        "tile_rule": TILE_RULE,
        "tiles": {str(arch): {name: dataclasses.asdict(tile) for name, tile in GEMM_TILES[arch].items()}
                  for arch in archs},
        "workspace_bytes": {name: substitute(formula, {"BLOCK_E": AOT_MAX_EXPERTS})
                            for name, formula in WORKSPACE.items()},
        "variants": [{"name": m["name"], "kernel": m["kernel"], "arch": m["arch"], "dtype": m["dtype"],
                      "tile": m["tile"], "quant": m["quant"], "metadata": f"{m['name']}.json"} for m in built],
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def _parse_list(value: str, option: str, choices: dict) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in choices]
    if bad or not items:
        raise MixexportError(f"{option} {value!r}: expected a comma-separated list of {', '.join(map(str, choices))}")
    return list(dict.fromkeys(choices[v] for v in items))


@click.command()
@click.option("--arch", default="80,86,89,90", show_default=True, help="Compute capabilities, comma-separated.")
@click.option("--dtype", default="fp16,bf16", show_default=True, help="Activation/weight dtypes, comma-separated.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the cubins, PTX and JSON metadata.")
@click.option("--quant", default="none", show_default=True,
              help=f"Expert weights of the GEMM variants, comma-separated: {', '.join(QUANT_SCHEMES)} "
                   "(none: the activation dtype).")
@click.option("--ptxas", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ptxas of the CUDA toolkit to compile with (default: triton's bundled one, which needs an "
                   "R580+ driver for sm_90).")
def main(arch: str, dtype: str, quant: str, output: Path, ptxas: Path | None) -> None:
    """Compile the MoE kernels ahead of time for the TensorRT plugin."""
    try:
        archs = _parse_list(arch, "--arch", {str(a): a for a in ARCHS})
        dtypes = _parse_list(dtype, "--dtype", DTYPES)
        quants = _parse_list(quant, "--quant", {q: q for q in QUANT_SCHEMES})
        start = time.perf_counter()
        index = build(archs, dtypes, output, ptxas, quants)
    except MixexportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {len(index['variants'])} kernel variants to {output} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
