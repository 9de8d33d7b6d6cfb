"""Dtype names as users write them, and their torch / ONNX counterparts."""

import torch

from mixexport.errors import MixexportError

# canonical name -> torch dtype; the canonical names are what config.json and the manifest use.
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "half": "float16"}
CHOICES = tuple(TORCH_DTYPES) + ("fp32", "fp16", "bf16")


def canonical_dtype(name: "str | torch.dtype") -> str:
    """Return the canonical dtype name (`float32|float16|bfloat16`) for a name, alias or torch dtype."""
    if isinstance(name, torch.dtype):
        for canonical, dtype in TORCH_DTYPES.items():
            if dtype == name:
                return canonical
        raise MixexportError(f"dtype {name} is not supported; use one of float32, float16, bfloat16")
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in TORCH_DTYPES:
        raise MixexportError(f"dtype {name!r} is not supported; use one of {', '.join(CHOICES)}")
    return key


def torch_dtype(name: "str | torch.dtype") -> torch.dtype:
    """The torch dtype for a name, alias or torch dtype."""
    return TORCH_DTYPES[canonical_dtype(name)]
