"""The graph dtypes: one table of each dtype's names and its torch, numpy and ONNX counterparts.

The canonical names (`float32|float16|bfloat16`) are what config.json, the manifest and every
option use; `short` is the kernels' name (fp16); aliases are what users may type.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import torch

from mixexport.errors import MixexportError


@dataclasses.dataclass(frozen=True)
class DType:
    name: str  # canonical
    short: str  # fp32, fp16, bf16: the kernels' and plugin's name
    torch: torch.dtype
    numpy: np.dtype  # bfloat16 is ml_dtypes' (numpy has none)
    onnx: int  # onnx.TensorProto element type
    itemsize: int


# onnx.TensorProto element types, as numbers, so this leaf module does not import onnx.
_ONNX_FLOAT, _ONNX_FLOAT16, _ONNX_BFLOAT16 = 1, 10, 16
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float32", "fp32", torch.float32, np.dtype(np.float32), _ONNX_FLOAT, 4),
    DType("float16", "fp16", torch.float16, np.dtype(np.float16), _ONNX_FLOAT16, 2),
    DType("bfloat16", "bf16", torch.bfloat16, np.dtype(ml_dtypes.bfloat16), _ONNX_BFLOAT16, 2),
)}
TORCH_DTYPES = {name: d.torch for name, d in DTYPES.items()}
BY_ONNX: dict[int, DType] = {d.onnx: d for d in DTYPES.values()}  # ONNX element type -> its row
ALIASES = {"float": "float32", "half": "float16", **{d.short: d.name for d in DTYPES.values()}}
CHOICES = tuple(DTYPES) + tuple(d.short for d in DTYPES.values())


def canonical_dtype(name: "str | torch.dtype") -> str:
    """Return the canonical dtype name (`float32|float16|bfloat16`) for a name, alias or torch dtype."""
    if isinstance(name, torch.dtype):
        for d in DTYPES.values():
            if d.torch == name:
                return d.name
        raise MixexportError(f"dtype {name} is not supported; use one of {', '.join(DTYPES)}")
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise MixexportError(f"dtype {name!r} is not supported; use one of {', '.join(CHOICES)}")
    return key


def dtype_info(name: "str | torch.dtype") -> DType:
    """The table row of a name, alias or torch dtype."""
    return DTYPES[canonical_dtype(name)]


def torch_dtype(name: "str | torch.dtype") -> torch.dtype:
    """The torch dtype for a name, alias or torch dtype."""
    return dtype_info(name).torch
