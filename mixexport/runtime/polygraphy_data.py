"""Consistent feeds for Polygraphy's stock CLI, from an artifact's manifest.

`polygraphy run` feeds length-1 tensors for every dynamic dimension unless told otherwise, which a
decoder graph with a KV cache refuses (the attention mask must be past + new tokens long). This
script gives it a prefill and decode steps whose shapes agree, so a user's CI can compare an
artifact's graphs (or a graph and its TensorRT engine) with the stock tool:

    MIXEXPORT_ARTIFACT=OUT polygraphy run OUT/ort/model.onnx --onnxrt \\
        --data-loader-script "$(python -m mixexport.runtime.polygraphy_data --path)"

The feeds are synthetic (random ids, random caches): every runner gets the same ones, which is what
a comparison between runners needs; `mixexport validate` is the check against the PyTorch reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixexport import graph_io
from mixexport.artifact.manifest import read_manifest
from mixexport.dtypes import dtype_info
from mixexport.errors import MixexportError

ARTIFACT_ENV = "MIXEXPORT_ARTIFACT"


def feeds(manifest: dict[str, Any], batch: int = 1, prompt: int = 8, decode_steps: int = 2,
          seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """A prefill of `prompt` tokens, then `decode_steps` single-token steps, each with a mask of past +
    new tokens, positions that follow on, and a cache as long as the past; all clamped to the
    manifest's dynamic ranges.

    Args:
        manifest: an artifact's manifest (`read_manifest`).
    """
    model, dims = manifest.model, manifest.dynamic_dims
    dtype = dtype_info(manifest.dtype).numpy
    batch = max(1, min(batch, dims[graph_io.BATCH][1]))
    total = dims[graph_io.TOTAL][1]
    decode_steps = max(0, min(decode_steps, total - 1))
    prompt = max(1, min(prompt, dims[graph_io.SEQUENCE][1], total - decode_steps))
    kv_heads, head_dim = model["num_key_value_heads"], model["head_dim"]
    rng = np.random.default_rng(seed)
    past = 0
    for seq in [prompt] + [1] * decode_steps:
        feed = {"input_ids": rng.integers(0, model["vocab_size"], (batch, seq), dtype=np.int64),
                "attention_mask": np.ones((batch, past + seq), np.int64),
                "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))}
        for layer in range(model["num_hidden_layers"]):
            for name in graph_io.past_names(layer):
                feed[name] = (0.1 * rng.standard_normal((batch, kv_heads, past, head_dim))).astype(dtype)
        yield feed
        past += seq


def load_data() -> Iterator[dict[str, np.ndarray]]:
    """Polygraphy's entry point (`--data-loader-script`): the feeds of the artifact named by
    $MIXEXPORT_ARTIFACT."""
    out = os.environ.get(ARTIFACT_ENV)
    if not out:
        raise MixexportError(f"set {ARTIFACT_ENV}=OUT (the artifact directory) for mixexport's Polygraphy data loader")
    return feeds(read_manifest(Path(out)))


if __name__ == "__main__":
    if sys.argv[1:] == ["--path"]:
        print(Path(__file__).resolve())
    else:
        sys.exit("usage: python -m mixexport.runtime.polygraphy_data --path  (prints this script's path)")
