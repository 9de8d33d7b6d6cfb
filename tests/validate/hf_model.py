"""A tiny Mixtral written by transformers' own `save_pretrained`: the checkpoint layout real users
bring, for the tests that compare artifacts with transformers."""

from __future__ import annotations

import math

import torch
from transformers import MixtralConfig, MixtralForCausalLM

H, KVH, D, LAYERS, VOCAB = 48, 2, 16, 2, 97


def write_hf_checkpoint(path, hidden: int = H, intermediate: int = 40) -> MixtralForCausalLM:
    """A random Mixtral saved into `path` by transformers' own `save_pretrained`; returns the model.
    Seeded: the same weights every call."""
    torch.manual_seed(1234)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KVH, head_dim=D,
                           num_local_experts=4, num_experts_per_tok=2, rope_theta=1e4, max_position_embeddings=256,
                           attn_implementation="eager")
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # decisive routing (logits O(1)) instead of the near-uniform 0.02 init
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0 / math.sqrt(hidden))
    model.save_pretrained(path)
    return model
