"""Consistent feeds for Polygraphy's stock CLI, from an artifact's manifest.

`polygraphy run` feeds length-1 tensors for every dynamic dimension unless told otherwise, which a
decoder graph with a KV cache refuses (the attention mask must be past + new tokens long). This
script gives it a prefill and decode steps whose shapes agree, so a user's CI can compare an
artifact's graphs (or a graph and its TensorRT engine) with the stock tool:

    MIXEXPORT_ARTIFACT=OUT polygraphy run OUT/ort/model.onnx --onnxrt \\
        --data-loader-script "$(python -m mixexport.runtime.polygraphy_data --path)"

Which graph the feeds are for: `MIXEXPORT_GRAPH`, the graph's path in OUT (`ort/model.onnx`, or a
stage of a staged target, `ort/stage-1/model.onnx`). Without it, the artifact's whole graphs, when
they all take the same inputs; when they do not (an ort graph built with `--kv-layout shared`
beside concat-layout targets), the loader says which paths to choose from.

The feeds follow the graph's input bindings in the manifest, dimension by dimension: a
concat-layout cache is as long as the past; a shared-layout one is one static buffer long enough
for the whole run (as onnxruntime-genai allocates it), the mask covering the tokens so far; a
stage after the first gets a residual stream in place of `input_ids`. They are synthetic (random
ids, states and caches): every runner gets the same ones, which is what a comparison between
runners needs; `mixexport validate` is the check against the PyTorch reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixexport import graph_io
from mixexport.artifact.manifest import Manifest, read_manifest
from mixexport.dtypes import dtype_info
from mixexport.errors import MixexportError

ARTIFACT_ENV = "MIXEXPORT_ARTIFACT"
GRAPH_ENV = "MIXEXPORT_GRAPH"


def graphs(manifest: Manifest) -> dict[str, list[dict[str, Any]]]:
    """Every ONNX graph of the artifact (OUT-relative path -> its input bindings): each target's
    whole graph, then its stages'."""
    found = {}
    for entry in manifest.targets.values():
        found[entry.onnx] = entry.inputs
        for stage in entry.stages or []:
            found[stage["onnx"]] = stage["inputs"]
    return found


def graph_inputs(manifest: Manifest, graph: str | None = None) -> list[dict[str, Any]]:
    """The input bindings of `graph` (an OUT-relative path from `graphs`), or, with None, those all
    the whole graphs share.

    Raises:
        MixexportError: `graph` is not one of the artifact's graphs, or the whole graphs differ.
    """
    known = graphs(manifest)
    if graph is not None:
        if graph not in known:
            raise MixexportError(f"{GRAPH_ENV}={graph} is not a graph of this artifact (one of: {', '.join(known)})")
        return known[graph]
    whole = {entry.onnx: entry.inputs for entry in manifest.targets.values()}
    first = next(iter(whole.values()))
    if any(inputs != first for inputs in whole.values()):
        raise MixexportError(f"this artifact's graphs take different inputs: set {GRAPH_ENV} to the graph "
                             f"Polygraphy runs (one of: {', '.join(whole)})")
    return first


def _array(binding: dict[str, Any], shape: tuple[int, ...], past: int, rng: np.random.Generator,
           vocab: int) -> np.ndarray:
    """The value of one input, by what it is (`graph_io`'s names)."""
    name = binding["name"]
    if name == "input_ids":
        return rng.integers(0, vocab, shape, dtype=np.int64)
    if name == "attention_mask":
        return np.ones(shape, np.int64)
    if name == "position_ids":
        return np.tile(np.arange(past, past + shape[1], dtype=np.int64), (shape[0], 1))
    scale = 0.1 if name.startswith("past_key_values.") else 1.0 if name.startswith("hidden_states.") else None
    if scale is None:
        raise MixexportError(f"the graph input {name!r} is not one mixexport's Polygraphy data loader knows how to feed")
    return (scale * rng.standard_normal(shape)).astype(dtype_info(binding["dtype"]).numpy)


def _shape(binding: dict[str, Any], sizes: dict[str, int]) -> tuple[int, ...]:
    """A binding's shape at one step: its fixed sizes, and its dynamic dimensions' sizes now."""
    unknown = [d for d in binding["shape"] if not isinstance(d, int) and d not in sizes]
    if unknown:
        raise MixexportError(f"the graph input {binding['name']!r} has a dimension {unknown[0]!r} that mixexport's "
                             f"Polygraphy data loader does not know")
    return tuple(d if isinstance(d, int) else sizes[d] for d in binding["shape"])


def feeds(manifest: Manifest, graph: str | None = None, batch: int = 1, prompt: int = 8, decode_steps: int = 2,
          seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """A prefill of `prompt` tokens, then `decode_steps` single-token steps, each with a mask of past +
    new tokens, positions that follow on, and a cache as long as the past (or a shared buffer as
    long as the whole run); all clamped to the manifest's dynamic ranges.

    Args:
        manifest: an artifact's manifest (`read_manifest`).
        graph: the graph fed (`graph_inputs`).
    """
    inputs = graph_inputs(manifest, graph)
    dims = manifest.dynamic_dims
    batch = max(1, min(batch, dims[graph_io.BATCH][1]))
    total = dims[graph_io.TOTAL][1]
    if graph_io.KV_BUFFER in dims:
        total = min(total, dims[graph_io.KV_BUFFER][1])
    decode_steps = max(0, min(decode_steps, total - 1))
    prompt = max(1, min(prompt, dims[graph_io.SEQUENCE][1], total - decode_steps))
    sizes = {graph_io.BATCH: batch, graph_io.KV_BUFFER: prompt + decode_steps}
    rng = np.random.default_rng(seed)
    past = 0
    for seq in [prompt] + [1] * decode_steps:
        sizes.update({graph_io.SEQUENCE: seq, graph_io.PAST: past, graph_io.TOTAL: past + seq})
        feed = {}
        for binding in inputs:
            feed[binding["name"]] = _array(binding, _shape(binding, sizes), past, rng, manifest.model["vocab_size"])
        yield feed
        past += seq


def load_data() -> Iterator[dict[str, np.ndarray]]:
    """Polygraphy's entry point (`--data-loader-script`): the feeds of the artifact named by
    $MIXEXPORT_ARTIFACT, for the graph $MIXEXPORT_GRAPH (when set)."""
    out = os.environ.get(ARTIFACT_ENV)
    if not out:
        raise MixexportError(f"set {ARTIFACT_ENV}=OUT (the artifact directory) for mixexport's Polygraphy data loader")
    return feeds(read_manifest(Path(out)), os.environ.get(GRAPH_ENV) or None)


if __name__ == "__main__":
    if sys.argv[1:] == ["--path"]:
        print(Path(__file__).resolve())
    else:
        sys.exit("usage: python -m mixexport.runtime.polygraphy_data --path  (prints this script's path)")
