"""The decoder graph's inputs and outputs: one spec that capture, the passes, the TensorRT build,
validation, the runtime and the manifest all read.

Names follow onnxruntime-genai and Optimum: `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key|value` in; `logits`, `present.{i}.key|value` out.
"""

from __future__ import annotations

import dataclasses

from mixexport.checkpoint.config import MixtralConfig

# Symbolic dimension names used in every graph and in the manifest.
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


@dataclasses.dataclass(frozen=True)
class Binding:
    """One graph input or output."""

    name: str
    dtype: str  # "int64", "float32", "float16", "bfloat16"
    shape: tuple  # ints and symbolic dimension names

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def router_logits_name(layer: int) -> str:
    """The value feeding layer `layer`'s MoE block in every target graph (not a graph output:
    validation exposes it to measure router-decision agreement)."""
    return f"layers.{layer}.moe.router_logits"


def inputs(config: MixtralConfig, dtype: str) -> list[Binding]:
    """Graph inputs in their positional order: ids, mask, positions, then (key, value) per layer."""
    kv = (BATCH, config.num_key_value_heads, PAST, config.head_dim)
    bindings = [
        Binding("input_ids", "int64", (BATCH, SEQUENCE)),
        Binding("attention_mask", "int64", (BATCH, TOTAL)),
        Binding("position_ids", "int64", (BATCH, SEQUENCE)),
    ]
    for layer in range(config.num_hidden_layers):
        bindings += [Binding(name, dtype, kv) for name in past_names(layer)]
    return bindings


def outputs(config: MixtralConfig, dtype: str) -> list[Binding]:
    """Graph outputs in their positional order: logits, then (key, value) per layer."""
    kv = (BATCH, config.num_key_value_heads, TOTAL, config.head_dim)
    bindings = [Binding("logits", "float32", (BATCH, SEQUENCE, config.vocab_size))]
    for layer in range(config.num_hidden_layers):
        bindings += [Binding(name, dtype, kv) for name in present_names(layer)]
    return bindings
