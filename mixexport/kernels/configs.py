"""Tile configurations, launch grids and workspace sizes: the one table the host pipeline, the AOT
compiler and (through the AOT metadata) the TensorRT plugin all read.

Nothing here imports triton, so the plugin build and the metadata tests can use it anywhere.
Grid and workspace sizes are formulas over the problem dimensions N (tokens), H, I, E, K and the
kernels' compile-time tile sizes. They are static upper bounds: the launch never depends on how the
router spread the tokens, which is what lets the pipeline run without a host synchronization
(TensorRT enqueue, CUDA graphs). Blocks past the routed work exit on the device.
"""

from __future__ import annotations

import dataclasses
import re

from mixexport.errors import MixexportError
from mixexport.quant import QuantScheme

# Largest dynamic shared memory one block may opt into (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES),
# from the CUDA programming guide's compute-capability table.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = tuple(SHARED_MEMORY_LIMIT)


# Blocks of token rows that run one after another over the same weight columns (both GEMMs):
# consecutive programs then share a weight tile while it is in L2, instead of each weight tile
# being streamed from DRAM once per block of rows. The rows of a group mostly belong to one expert
# (an expert's blocks are contiguous), so this is the grouping of Triton's matmul tutorial applied
# to the expert-sorted layout.
GEMM_GROUP_M = 8


@dataclasses.dataclass(frozen=True)
class GemmTile:
    """Tile sizes of the two grouped GEMMs; both share BLOCK_M because they share the token layout."""

    block_m: int  # sorted token slots per block (the alignment pads every expert to a multiple of it)
    block_n: int  # output columns per block (I for gate/up, H for down)
    block_k: int  # reduction step (H for gate/up, I for down)
    num_warps: int
    num_stages: int
    # The down GEMM's reduction over I split into this many programs per output tile, each writing
    # its own fp32 partial sum, which topk_reduce adds in a fixed order (deterministic, no atomics).
    split_k: int = 1

    def constexprs(self, kernel: str) -> dict[str, int]:
        """The constexprs of `kernel` ("gate_up" or "down") for this tile."""
        common = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": GEMM_GROUP_M}
        return {**common, "SPLIT_K": self.split_k} if kernel == "down" else common


# Per architecture, two tiles: "small_m" for decode-sized batches, where each expert sees a handful
# of tokens and a 64-row tile would mostly multiply padding (the GEMMs are bandwidth bound there, so
# the weight stream needs deep pipelining more than MMA efficiency), and "large_m" for prefill.
# small_m splits the down GEMM's I in 4: at one token (two experts) Mixtral 8x7B's down GEMM has
# 2 blocks x cdiv(4096, 128) = 64 output tiles, half an H100/H200's 132 SMs; split in 4 it has 256
# programs in flight to stream the weights (an estimate: no GPU has timed this yet).
# Shared memory per stage is BLOCK_K * (BLOCK_M + 2 * BLOCK_N) * 2 bytes for gate/up (A plus the
# gate and up weight tiles) and BLOCK_K * (BLOCK_M + BLOCK_N) * 2 for down; the stage counts are
# chosen so the gate/up kernel, the larger of the two, fits each architecture's limit (the AOT test
# checks the compiled sizes).
GEMM_TILES = {
    80: {"small_m": GemmTile(16, 64, 128, 4, 4, split_k=4), "large_m": GemmTile(64, 128, 64, 4, 4)},
    86: {"small_m": GemmTile(16, 64, 64, 4, 4, split_k=4), "large_m": GemmTile(64, 64, 64, 4, 4)},
    89: {"small_m": GemmTile(16, 64, 64, 4, 4, split_k=4), "large_m": GemmTile(64, 64, 64, 4, 4)},
    90: {"small_m": GemmTile(16, 128, 128, 4, 4, split_k=4), "large_m": GemmTile(64, 128, 64, 8, 4)},
}
# The interpreter runs one program at a time in numpy: few, small programs keep the tests fast. Two
# tiles, picked by the same rule, so the tests run the split-K and the unsplit down GEMM.
INTERPRETER_TILES = {"small_m": GemmTile(16, 32, 32, 4, 1, split_k=2), "large_m": GemmTile(32, 32, 32, 4, 1)}
# The tile follows the tokens per expert: "small_m" while the routed slots average at most this
# many per expert (two 16-row blocks); beyond it the 64-row tile's MMAs are worth its padding.
SMALL_M_MAX_SLOTS_PER_EXPERT = 32
TILE_RULE = f"small_m if N*K <= {SMALL_M_MAX_SLOTS_PER_EXPERT}*E else large_m"

# Tiles of the small kernels, the same on every architecture.
ROUTING_BLOCK_T = 16  # tokens per routing program
ALIGN_BLOCK_S = 256  # routed slots per alignment program (one histogram chunk)
ALIGN_BLOCK_C = 64  # chunk histograms read per step when a program scans the others
REDUCE_BLOCK_H = 512  # hidden columns per reduction program
# The AOT kernels hold one register lane per expert; 64 covers every Mixtral-family router.
AOT_MAX_EXPERTS = 64
# The kernels are compiled assuming H and I are multiples of this (vectorized loads along them).
SHAPE_MULTIPLE = 16
AOT_NUM_WARPS = 4

# Launch grids (1-D) per kernel, over N, H, I, E, K and each kernel's constexprs.
# MAX_BLOCKS bounds the padded blocks: each expert that gets a slot adds under one block of padding,
# and at most min(E, N*K) experts get one (at N = 1, top-2: 3 blocks, not 1 + E).
MAX_BLOCKS = "(cdiv(N*K, BLOCK_M) + min(E, N*K))"
GRIDS = {
    "routing": "cdiv(N, BLOCK_T)",
    "align_count": "cdiv(N*K, BLOCK_S)",
    "align_scatter": "cdiv(N*K, BLOCK_S)",
    "gate_up": f"{MAX_BLOCKS} * cdiv(I, BLOCK_N)",
    "down": f"{MAX_BLOCKS} * cdiv(H, BLOCK_N) * SPLIT_K",
    "topk_reduce": "N * cdiv(H, BLOCK_H)",
}

# Device buffers between the kernels, in bytes; ACT_BYTES is the element size of x's dtype.
WORKSPACE = {
    "topk_weights": "N*K*4",  # fp32 [N, K]
    "topk_ids": "N*K*4",  # int32 [N, K]
    "chunk_counts": f"cdiv(N*K, {ALIGN_BLOCK_S})*BLOCK_E*4",  # int32 per-chunk expert histograms
    "sorted_ids": f"{MAX_BLOCKS}*BLOCK_M*4",  # int32 slot n*K+j per padded row, N*K = padding
    "expert_ids": f"{MAX_BLOCKS}*4",  # int32 expert per block, -1 past the last
    "act": f"{MAX_BLOCKS}*BLOCK_M*I*ACT_BYTES",  # silu(gate)*up per padded row, x's dtype
    "y": "SPLIT_K*N*K*H*4",  # fp32 weighted expert outputs per slot and I split, summed by topk_reduce
}

_FORMULA = re.compile(r"^[A-Za-z0-9_+*/() ,-]+$")


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def substitute(formula: str, constants: dict[str, int]) -> str:
    """Replace constexpr names in a grid or workspace formula by their values."""
    for name, value in constants.items():
        formula = re.sub(rf"\b{name}\b", str(value), formula)
    return formula


def evaluate(formula: str, **values: int) -> int:
    """Evaluate a grid or workspace formula (integer arithmetic, `cdiv` and `min` only).

    Args:
        formula: e.g. "(cdiv(N*K, BLOCK_M) + E) * cdiv(I, BLOCK_N)".
        **values: every name the formula uses.

    Returns:
        The integer value.
    """
    if not _FORMULA.match(formula):
        raise MixexportError(f"grid formula {formula!r} has characters outside integer arithmetic")
    return int(eval(formula, {"__builtins__": {}}, {"cdiv": cdiv, "min": min, **values}))  # noqa: S307 (checked above)


def quant_constexprs(bits: int, group_size: int | None) -> dict[str, int]:
    """The GEMM kernels' QUANT_BITS and GROUP_SIZE for weights of `bits` (0: the activation dtype) with
    `group_size` columns per scale (None: one scale per row, which the kernels and the plugin
    contract spell 0)."""
    return {"QUANT_BITS": bits, "GROUP_SIZE": group_size or 0}


def tile_name(num_slots: int, num_experts: int) -> str:
    """TILE_RULE: "small_m" or "large_m" for N*K routed slots over E experts."""
    return "small_m" if num_slots <= SMALL_M_MAX_SLOTS_PER_EXPERT * num_experts else "large_m"


def gemm_tile(arch: int, num_slots: int, num_experts: int) -> tuple[str, GemmTile]:
    """Pick the GEMM tile for a device architecture and a batch.

    Args:
        arch: compute capability as major*10+minor (80, 86, 89, 90, ...).
        num_slots: routed token slots, N*K.
        num_experts: E.

    Returns:
        (tile name, tile). Architectures newer than the table use the closest older entry whose
        shared memory they are known to have: consumer parts (sm_120) have sm_86's 99 KB.
    """
    if arch < 80:
        raise MixexportError(f"the Triton MoE kernels need an sm_80 or newer GPU, this one is sm_{arch}")
    known = 90 if arch in (90, 100, 103) else max(a for a in ARCHS if a <= arch and a != 90)
    name = tile_name(num_slots, num_experts)
    return name, GEMM_TILES[known][name]


def kernel_shape_refusal(hidden: int, intermediate: int, experts: int, scheme: QuantScheme | None = None) -> str | None:
    """Why the AOT kernels cannot serve a model of these shapes, or None when they can: the one
    statement of the shape limits, read by the trt backend and (through the AOT metadata) the plugin.

    Args:
        hidden, intermediate, experts: H, I, E.
        scheme: the experts' weight-only quantization, None for weights in the model dtype.

    Returns:
        One line saying what the kernels need and what this model has, or None.
    """
    if hidden % SHAPE_MULTIPLE or intermediate % SHAPE_MULTIPLE or experts > AOT_MAX_EXPERTS:
        return (f"the MixtralMoE plugin's kernels need hidden and intermediate sizes that are multiples of "
                f"{SHAPE_MULTIPLE} and at most {AOT_MAX_EXPERTS} experts; this model has H {hidden}, "
                f"I {intermediate}, E {experts}")
    if scheme is None or scheme.group_size is None:
        return None
    refusal = scheme.refusal(hidden, intermediate)
    if refusal:
        return f"the MixtralMoE plugin's {scheme.name} kernels dequantize whole groups: {refusal}"
    # A K step of the GEMMs must cover whole groups or lie inside one (the two sizes nest), so each
    # step reads whole groups' scales and a group never straddles a step boundary.
    for arch, tiles in GEMM_TILES.items():
        for name, tile in tiles.items():
            if tile.block_k % scheme.group_size and scheme.group_size % tile.block_k:
                return (f"the MixtralMoE plugin's {scheme.name} kernels need the group size {scheme.group_size} and "
                        f"the sm_{arch} {name} tile's K block {tile.block_k} to divide one another")
    return None
