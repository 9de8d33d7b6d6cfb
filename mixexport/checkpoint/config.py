"""The model config: what mixexport reads from `config.json`, and the built-in presets.

Only what the reference decoder implements is accepted; anything else is refused up front with a
message that names the field and its value, so a user never gets an artifact that silently
computes another model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mixexport.dtypes import canonical_dtype
from mixexport.errors import MixexportError


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Shapes and constants of a Mixtral-family decoder.

    Dimension letters used across mixexport: B batch, S sequence, P past length, H hidden,
    I intermediate, E experts, K top-k, N tokens (= B*S), V vocab, D head dim.
    """

    hidden_size: int  # H
    intermediate_size: int  # I (per expert)
    num_hidden_layers: int  # L
    num_attention_heads: int
    num_key_value_heads: int  # KVH
    head_dim: int  # D
    num_local_experts: int  # E
    num_experts_per_tok: int  # K
    vocab_size: int  # V
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    max_position_embeddings: int = 32768

    def __post_init__(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MixexportError(f"config field {name}={value!r} must be a positive integer")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise MixexportError(
                f"config field num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"num_local_experts={self.num_local_experts}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MixexportError(
                f"config field num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs it)")
        if self.head_dim % 2:
            raise MixexportError(f"config field head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise MixexportError(f"config field sliding_window={self.sliding_window!r} must be null or a positive integer")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))

    @property
    def num_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> "MixtralConfig":
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "MixtralConfig":
        """Parse a Hugging Face `config.json` dict, refusing what the reference does not implement."""
        return cls(**_parse_hf_dict(raw, source))

    @classmethod
    def from_file(cls, path: str | Path) -> "MixtralConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise MixexportError(f"{path} not found: a checkpoint directory needs a config.json") from None
        except json.JSONDecodeError as exc:
            raise MixexportError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise MixexportError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(raw, str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` content Hugging Face's MixtralForCausalLM loads (transformers 4 and 5)."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers < 5 reads the top-level key, transformers 5 rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": self.dtype,
            "dtype": self.dtype,
        }


def _parse_hf_dict(raw: dict[str, Any], source: str) -> dict[str, Any]:
    def refuse(field: str, value: Any, why: str) -> MixexportError:
        return MixexportError(f"{source}: {field}={value!r} is not supported: {why}")

    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or ["MixtralForCausalLM"]
    if model_type != "mixtral":
        raise refuse("model_type", model_type, "mixexport exports Mixtral-family decoders (model_type 'mixtral')")
    if "MixtralForCausalLM" not in architectures:
        raise refuse("architectures", architectures, "expected MixtralForCausalLM")

    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise refuse("hidden_act", hidden_act, "Mixtral experts use SiLU; other activations are not implemented")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field):
            raise refuse(field, raw[field], "Mixtral projections have no bias and mixexport implements none")

    rope_theta = raw.get("rope_theta")
    rope_parameters = raw.get("rope_parameters")
    if isinstance(rope_parameters, dict):
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if rope_type != "default":
            raise refuse("rope_parameters.rope_type", rope_type, "only default rotary embeddings are implemented")
        rope_theta = rope_parameters.get("rope_theta", rope_theta)
    elif rope_parameters is not None:
        raise refuse("rope_parameters", rope_parameters, "expected an object")
    rope_scaling = raw.get("rope_scaling")
    if rope_scaling:
        scaling_type = rope_scaling.get("rope_type", rope_scaling.get("type")) if isinstance(rope_scaling, dict) else rope_scaling
        if scaling_type != "default":
            raise refuse("rope_scaling", rope_scaling, "only default rotary embeddings are implemented")
    if rope_theta is None:
        rope_theta = 1e6
    if not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
        raise refuse("rope_theta", rope_theta, "must be a positive number")

    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise refuse("dtype", dtype, "use float32, float16 or bfloat16")

    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_local_experts", "num_experts_per_tok", "vocab_size")
    missing = [name for name in required if name not in raw]
    if missing:
        raise MixexportError(f"{source}: missing required field(s) {', '.join(missing)}")

    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if raw["hidden_size"] % heads:
            raise refuse("head_dim", None, f"hidden_size={raw['hidden_size']} is not a multiple of "
                         f"num_attention_heads={heads}; set head_dim explicitly")
        head_dim = raw["hidden_size"] // heads

    return dict(
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        num_local_experts=raw["num_local_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"],
        vocab_size=raw["vocab_size"],
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        sliding_window=raw.get("sliding_window"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=dtype,
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
    )


# Named presets. `tiny` and `small` are for tests and demos; the big ones have the real shapes.
PRESETS: dict[str, MixtralConfig] = {
    "tiny": MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        vocab_size=256, rope_theta=1e4, dtype="float32", max_position_embeddings=4096),
    "small": MixtralConfig(
        hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, rope_theta=1e6, dtype="float32", max_position_embeddings=4096),
    "mixtral-8x7b": MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, rope_theta=1e6, dtype="bfloat16", max_position_embeddings=32768),
    "mixtral-8x22b": MixtralConfig(
        hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32768, rope_theta=1e6, dtype="bfloat16", max_position_embeddings=65536),
}


def preset(name: str) -> MixtralConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise MixexportError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
