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
# The static KV buffers' length in the shared layout (genai allocates them max_length long).
KV_BUFFER = "kv_buffer_length"

# How a graph keeps its KV cache:
# - "concat": past [B, KVH, P, D] in, present = concat(past, new) [B, KVH, P+S, D] out; the mask
#   is [B, P+S] and may pad anywhere (the parity scenario pads on the left).
# - "shared": past and present are one static buffer [B, KVH, M, D] (genai's
#   past_present_share_buffer), updated in place at each row's next slots; the mask is [B, T],
#   T <= M the tokens so far, each row's tokens packed at its front (com.microsoft.GroupQueryAttention's
#   seqlens_k contract, `targets.ort.fuse_gqa`).
KV_LAYOUTS = ("concat", "shared")
# The manifest field (of a target entry that records it) naming its graph's layout; absent: concat.
KV_LAYOUT_FIELD = "kv_layout"


@dataclasses.dataclass(frozen=True)
class KvLayout:
    """A graph's KV layout (one of KV_LAYOUTS) and what its lowering needs to know for it: the
    model's sliding window, which an attention op with its own causal mask applies itself."""

    name: str = "concat"
    sliding_window: int | None = None


CONCAT = KvLayout()


def kv_layout_of(extra: dict) -> str:
    """The KV layout a manifest target entry's `extra` fields record (concat where absent)."""
    return extra.get(KV_LAYOUT_FIELD, "concat")


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


def inputs(config: MixtralConfig, dtype: str, kv_layout: str = "concat") -> list[Binding]:
    """Graph inputs in their positional order: ids, mask, positions, then (key, value) per layer
    (`kv_layout`: one of KV_LAYOUTS)."""
    kv = (BATCH, config.num_key_value_heads, PAST if kv_layout == "concat" else KV_BUFFER, config.head_dim)
    bindings = [
        Binding("input_ids", "int64", (BATCH, SEQUENCE)),
        Binding("attention_mask", "int64", (BATCH, TOTAL)),
        Binding("position_ids", "int64", (BATCH, SEQUENCE)),
    ]
    for layer in range(config.num_hidden_layers):
        bindings += [Binding(name, dtype, kv) for name in past_names(layer)]
    return bindings


def outputs(config: MixtralConfig, dtype: str, kv_layout: str = "concat") -> list[Binding]:
    """Graph outputs in their positional order: logits, then (key, value) per layer
    (`kv_layout`: one of KV_LAYOUTS)."""
    kv = (BATCH, config.num_key_value_heads, TOTAL if kv_layout == "concat" else KV_BUFFER, config.head_dim)
    bindings = [Binding("logits", "float32", (BATCH, SEQUENCE, config.vocab_size))]
    for layer in range(config.num_hidden_layers):
        bindings += [Binding(name, dtype, kv) for name in present_names(layer)]
    return bindings


def hidden_state_name(layer: int) -> str:
    """The residual stream [B, S, H] (model dtype) entering decoder layer `layer`: 0 is the
    embedding's output, `num_hidden_layers` the last layer's output (the final norm's input).
    Stage graphs meet at these values; `passes.name_graph` names them in every target graph."""
    return f"hidden_states.{layer}"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A contiguous part of the decoder graph: optionally the embedding, layers [first, end), and
    optionally the final norm + lm_head. Its inputs and outputs are its boundary: the whole graph
    is `Stage(0, L, embedding=True, head=True)`.
    """

    first: int
    end: int
    embedding: bool = False
    head: bool = False

    @property
    def name(self) -> str:
        parts = (["embedding"] if self.embedding else []) + (
            [f"layers.{self.first}-{self.end - 1}"] if self.end > self.first else []) + (
            ["head"] if self.head else [])
        return "+".join(parts)

    def inputs(self, config: MixtralConfig, dtype: str) -> list[Binding]:
        """Its inputs in positional order: input_ids (embedding) or the residual stream entering
        `first`; then, with layers, the mask, the positions and its layers' past (key, value)."""
        whole = {b.name: b for b in inputs(config, dtype)}
        hidden = Binding(hidden_state_name(self.first), dtype, (BATCH, SEQUENCE, config.hidden_size))
        bindings = [whole["input_ids"] if self.embedding else hidden]
        if self.end > self.first:
            bindings += [whole["attention_mask"], whole["position_ids"]]
            bindings += [whole[name] for layer in range(self.first, self.end) for name in past_names(layer)]
        return bindings

    def outputs(self, config: MixtralConfig, dtype: str, router_logits: bool = False) -> list[Binding]:
        """Its outputs in positional order: logits (head) or the residual stream leaving `end - 1`,
        its layers' present (key, value), then (with `router_logits`) its layers' router logits."""
        whole = {b.name: b for b in outputs(config, dtype)}
        hidden = Binding(hidden_state_name(self.end), dtype, (BATCH, SEQUENCE, config.hidden_size))
        bindings = [whole["logits"] if self.head else hidden]
        bindings += [whole[name] for layer in range(self.first, self.end) for name in present_names(layer)]
        if router_logits:
            bindings += [Binding(router_logits_name(layer), dtype, (f"{BATCH}*{SEQUENCE}", config.num_local_experts))
                         for layer in range(self.first, self.end)]
        return bindings
