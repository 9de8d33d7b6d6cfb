"""Checkpoint tensor names and the shapes the config implies: one table, read by the reader,
the writer and the reference model.

Hugging Face's classic Mixtral layout (what `save_pretrained` writes, transformers 4 and 5):
each expert is three separate matrices, w1 (gate) [I, H], w3 (up) [I, H], w2 (down) [H, I].
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Iterator

from mixexport.checkpoint.config import MixtralConfig

PREFIX = "model.layers.{i}."
EXPERT = PREFIX + "block_sparse_moe.experts.{e}.{w}.weight"
ROUTER = PREFIX + "block_sparse_moe.gate.weight"

# Non-expert tensors: checkpoint name -> shape as a function of the config.
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": lambda c: (c.vocab_size, c.hidden_size),
    "model.norm.weight": lambda c: (c.hidden_size,),
    "lm_head.weight": lambda c: (c.vocab_size, c.hidden_size),
}
LAYER_TENSORS = {
    PREFIX + "input_layernorm.weight": lambda c: (c.hidden_size,),
    PREFIX + "post_attention_layernorm.weight": lambda c: (c.hidden_size,),
    PREFIX + "self_attn.q_proj.weight": lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size),
    PREFIX + "self_attn.k_proj.weight": lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size),
    PREFIX + "self_attn.v_proj.weight": lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size),
    PREFIX + "self_attn.o_proj.weight": lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim),
    ROUTER: lambda c: (c.num_local_experts, c.hidden_size),
}
EXPERT_TENSORS = {
    "w1": lambda c: (c.intermediate_size, c.hidden_size),  # gate
    "w3": lambda c: (c.intermediate_size, c.hidden_size),  # up
    "w2": lambda c: (c.hidden_size, c.intermediate_size),  # down
}


def expert_name(layer: int, expert: int, which: str) -> str:
    return EXPERT.format(i=layer, e=expert, w=which)


def layer_shapes(config: MixtralConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of one decoder layer and its shape, in a stable order."""
    shapes = {name.format(i=layer): shape(config) for name, shape in LAYER_TENSORS.items()}
    for e in range(config.num_local_experts):
        for which, shape in EXPERT_TENSORS.items():
            shapes[expert_name(layer, e, which)] = shape(config)
    return shapes


def iter_expected_shapes(config: MixtralConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of this config must hold, in file order, one at
    a time: a check that stops at the first missing tensor never builds the whole table."""
    yield "model.embed_tokens.weight", GLOBAL_TENSORS["model.embed_tokens.weight"](config)
    for layer in range(config.num_hidden_layers):
        yield from layer_shapes(config, layer).items()
    yield "model.norm.weight", GLOBAL_TENSORS["model.norm.weight"](config)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", GLOBAL_TENSORS["lm_head.weight"](config)


def expected_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, and its shape, in file order."""
    return dict(iter_expected_shapes(config))


def weight_count(config: MixtralConfig) -> int:
    """How many weight elements the model has: its size is this times the dtype's itemsize (the
    config's bounds keep the walk over its tensors short)."""
    return sum(math.prod(shape) for _, shape in iter_expected_shapes(config))


_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT_INDEX = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.(\d+)\.")


def stored_counts(tensor_names: Iterable[str]) -> tuple[int, int]:
    """(distinct layer indices, distinct expert indices) among checkpoint tensor names.

    What a checkpoint can hold at most, to check config.json's layer and expert counts against
    before any table with one entry per layer or expert is built.
    """
    layers: set[str] = set()
    experts: set[str] = set()
    for name in tensor_names:
        if match := _LAYER_INDEX.match(name):
            layers.add(match[1])
            if match := _EXPERT_INDEX.match(name):
                experts.add(match[1])
    return len(layers), len(experts)
