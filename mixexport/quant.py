"""Weight-only quantization of the experts: the one scheme every target, kernel and check shares.

A weight W [N, K] (N output rows, K contiguous, as Mixtral stores w1/w3 [I, H] and w2 [H, I]) is
quantized symmetrically (no per-group zero point), per output row (int8) or per row and group of
`group_size` consecutive columns (int4), over the full signed range of the bit width:

    q[n, k]     = clamp(round(W[n, k] / scale[n, k // G]), qmin, qmax)   qmin, qmax = -128, 127 (int8); -8, 7 (int4)
    W'[n, k]    = q[n, k] * scale[n, k // G]                           (what every artifact computes with)

Each group's scale is the candidate with the least squared error sum((W - W')**2) over the group
(the first on a tie), among:
- m * r / qmin for the clip ratios r of `CLIP_RATIOS`, m the group's signed max-magnitude value:
  m lands on qmin (r = 1: llama.cpp's q4_0 choice, the scale's sign gives the extra negative level
  to whichever side holds m) or past it, clipped (r < 1: a finer step for the other values);
- m / qmax: the plain symmetric absmax/qmax scale, q in [-qmax, qmax], so no group reconstructs
  worse than with it;
- the least-squares scale sum(W q) / sum(q q) of the best candidate's q, re-rounded.
Each candidate is rounded to the scale dtype before it is scored. So a scale may be negative, and
q = qmin (stored byte or nibble 0) occurs; every consumer computes (stored - 2**(bits-1)) * scale.

Stored layout (one source for the ORT QMoE lowering, the portable DequantizeLinear lowering, the
TensorRT plugin and its kernels):
- `q` as uint8 with the offset 2**(bits-1) (q + 128, q + 8): the implicit zero point of
  onnxruntime's QMoE and of DequantizeLinear on uint8/uint4 with that zero point;
- int4 packs two values per byte along K, element 2j in the low nibble, 2j+1 in the high
  (ONNX's uint4 packing): [N, K/2] bytes;
- `scale` [N, K/G] (G = K for int8 per row, so [N, 1]) in the model dtype: every candidate is
  rounded to the model dtype before q is computed from it, so the dequantized reference is exactly
  what a kernel computes from the stored bytes.
Stacked per expert, the leading dimension E is added to both. A group's scale depends on that
group alone, so one expert (or one row) quantized alone is exactly its slice of a quantized stack.

An all-zero group gets scale 0 and q 0 (dequantizes to 0).
"""

from __future__ import annotations

import dataclasses

import torch

from mixexport.errors import MixexportError

BITS = (8, 4)
# Group sizes offered for int4 (int8 is per output row). A group must divide both K's of the
# experts (hidden_size for gate/up, intermediate_size for down).
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP = 32
# Clip ratios r searched per group, per bit width (module docstring). Chosen on Gaussian and
# Student-t weights (benchmarks/quant_accuracy.py): at 8 bits only a clip near 1 pays (a row of
# thousands has few outliers), at 4 bits deeper clips of a 32..128-value group do.
CLIP_RATIOS = {8: (1.0, 0.98, 0.96, 0.94), 4: (1.0, 0.95, 0.90, 0.85)}
# Rows searched at a time: about 2**18 float32 values, so the search's passes over them stay in cache.
_CHUNK_ELEMENTS = 2**18


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How the expert weights are stored: `bits` 8 or 4; `group_size` None means one group per row."""

    bits: int
    group_size: int | None = None

    def __post_init__(self):
        if self.bits not in BITS:
            raise MixexportError(f"experts quantization: bits must be one of {BITS}, not {self.bits!r}")
        if self.bits == 8 and self.group_size is not None:
            raise MixexportError("experts quantization: int8 is per output channel; a group size applies to int4")
        if self.bits == 4 and self.group_size not in INT4_GROUP_SIZES:
            raise MixexportError(f"experts quantization: the int4 group size must be one of "
                                 f"{', '.join(map(str, INT4_GROUP_SIZES))}, not {self.group_size!r}")

    @property
    def name(self) -> str:
        """`int8` or `int4-g32`: what the manifest, reports and file names say."""
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def offset(self) -> int:
        """The stored zero point: q + offset is what the uint8 (uint4) storage holds."""
        return 2 ** (self.bits - 1)

    def group(self, k: int) -> int:
        """The columns per scale for a weight with K = `k` columns."""
        return k if self.group_size is None else self.group_size

    def refusal(self, hidden_size: int, intermediate_size: int) -> str | None:
        """Why this scheme cannot store experts of these sizes (None: it can)."""
        for field, k in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if self.group_size is not None and k % self.group_size:
                return f"{self.name} needs {field} ({k}) to be a multiple of the group size {self.group_size}"
        return None

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": True,
                "storage": "uint8, zero point 2**(bits-1)" + (", two per byte, low nibble first" if self.bits == 4 else "")}


def parse_scheme(name: str | None, group_size: int | None = None) -> QuantScheme | None:
    """The scheme for `--experts-quant` (`int8`, `int4`, or None/`none`) and `--group-size`."""
    if name in (None, "none"):
        if group_size is not None:
            raise MixexportError("--group-size applies to --experts-quant int4")
        return None
    if name == "int8":
        return QuantScheme(8, group_size)
    if name == "int4":
        return QuantScheme(4, DEFAULT_INT4_GROUP if group_size is None else group_size)
    raise MixexportError(f"--experts-quant must be int8, int4 or none, not {name!r}")


def quantize(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [..., N, K] (any float dtype) as the module docstring says.

    Returns:
        (stored, scale): stored uint8 [..., N, K] for int8 or [..., N, K/2] for int4; scale
        [..., N, K/G] in `scale_dtype`.
    """
    *lead, n, k = weight.shape
    g = scheme.group(k)
    if k % g or (scheme.bits == 4 and k % 2):
        raise MixexportError(f"cannot quantize a weight with {k} columns as {scheme.name}")
    rows = weight.reshape(-1, k)
    stored = torch.empty(rows.shape, dtype=torch.uint8)
    scale = torch.empty(rows.shape[0], k // g, dtype=scale_dtype)
    step = max(1, _CHUNK_ELEMENTS // k)
    for start in range(0, rows.shape[0], step):
        w = rows[start:start + step].to(torch.float32).reshape(-1, k // g, g)  # [rows, groups, G]
        s = _searched_scale(w, scheme, scale_dtype)
        scale[start:start + step] = s.squeeze(-1)
        stored[start:start + step] = _levels(w, s, scheme).add_(scheme.offset).reshape(-1, k)
    stored = stored.reshape(*lead, n, k)
    if scheme.bits == 4:
        stored = stored[..., 0::2] | (stored[..., 1::2] << 4)
    return stored.contiguous(), scale.reshape(*lead, n, k // g)


def _levels(w: torch.Tensor, s: torch.Tensor, scheme: QuantScheme, out: torch.Tensor | None = None) -> torch.Tensor:
    """q = clamp(round(w / s), qmin, qmax) as float32, 0 where s is 0; w [R, groups, G], s [R, groups, 1]."""
    q = torch.div(w, torch.where(s != 0, s, 1), out=out)
    return q.round_().clamp_(scheme.qmin, scheme.qmax)


def _squared_error(w: torch.Tensor, s: torch.Tensor, scheme: QuantScheme, buf: torch.Tensor) -> torch.Tensor:
    """sum((w - q * s)**2) per group [R, groups, 1], computed in `buf` (w's shape) in place."""
    return _levels(w, s, scheme, out=buf).mul_(s).sub_(w).square_().sum(-1, keepdim=True)


def _searched_scale(w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype) -> torch.Tensor:
    """Each group's least-error scale among the module docstring's candidates: [R, groups, 1]
    float32 holding values of `scale_dtype` (each candidate is rounded to it before it is scored)."""
    # [R, groups, 1] the signed max-magnitude value (amax/amin: an argmax over 32 values is slow)
    high, low = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    m = torch.where(high >= -low, high, low)
    buf = torch.empty_like(w)
    best = best_error = None

    def consider(candidate: torch.Tensor) -> None:
        nonlocal best, best_error
        s = candidate.to(scale_dtype).to(torch.float32)
        error = _squared_error(w, s, scheme, buf)
        if best is None:
            best, best_error = s, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, s, best), torch.where(better, error, best_error)

    for r in CLIP_RATIOS[scheme.bits]:
        consider(m * (r / scheme.qmin))
    consider(m / scheme.qmax)
    q = _levels(w, best, scheme, out=buf)
    fit = (w * q).sum(-1, keepdim=True)
    consider(fit / q.square_().sum(-1, keepdim=True).clamp_min(1))  # q = 0 throughout: fit is 0 too
    return best


def unpack(stored: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The signed integer values q [..., N, K] (int8 tensor) of stored bytes."""
    if scheme.bits == 4:
        stored = torch.stack((stored & 0xF, stored >> 4), dim=-1).flatten(-2)
    return (stored.to(torch.int16) - scheme.offset).to(torch.int8)


def dequantize(stored: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """W' [..., N, K] in float32: the weights every quantized artifact computes with."""
    q = unpack(stored, scheme).to(torch.float32)
    k = q.shape[-1]
    g = scheme.group(k)
    return q * scale.to(torch.float32).repeat_interleave(g, dim=-1)
