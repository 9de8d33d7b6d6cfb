"""The model config: what mixexport reads from `config.json`, and the built-in presets.

Only what the reference decoder implements is accepted; anything else is refused up front with a
message that names the field and its value, so a user never gets an artifact that silently
computes another model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from mixexport.dtypes import DTYPES, canonical_dtype
from mixexport.errors import MixexportError
from mixexport.safe_io import cut, read_json_object

CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 4 * 1024**2  # a Mixtral config.json is about 1 KB

# Inclusive bounds on every integer field, checked before any arithmetic on the values. Each is
# far above the largest model of the kind (Mixtral 8x22B: H 6144, I 16384, 56 layers, 48 heads,
# 8 experts, vocab 32768, 65536 positions; the largest open decoders: H 16384-18432, 126 layers,
# vocab 262144; frankenMoEs merged from dense models: a few dozen experts) and low enough that
# every size computed from them stays in int64, which torch, ONNX and TensorRT dimensions use:
# the whole model in float32 is at most L*E*3*I*H*4 < 2**60 bytes.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 2**16),
    "intermediate_size": (1, 2**18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
    "num_local_experts": (1, 1024),
    "num_experts_per_tok": (1, 1024),
    "vocab_size": (1, 2**22),
    "max_position_embeddings": (1, 2**24),  # 16M positions
    "sliding_window": (1, 2**31 - 1),  # a window, not a size: anything up to int32 is harmless
}
# Open intervals (low, high] for the float fields; NaN and Infinity (which JSON parsers accept)
# fail them.
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "rms_norm_eps": (0.0, 1.0),  # Mixtral: 1e-5
    "rope_theta": (0.0, 1e12),  # Mixtral: 1e6; long-context fine-tunes reach a few 1e9
}


class _Refused(ValueError):
    """A config value mixexport refuses; the message does not name the source yet."""


def _show(value: Any) -> str:
    """A value as the user wrote it in config.json (JSON spelling, e.g. "2" for a string), cut short."""
    try:
        return cut(json.dumps(value))
    except (TypeError, ValueError):
        return cut(repr(value))


def _check_int(name: str, value: Any) -> int:
    low, high = INT_BOUNDS[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Refused(f"{name} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise _Refused(f"{name} must be between {low} and {high}, got {_show(value)}")
    return value


def _check_float(name: str, value: Any) -> float:
    low, high = FLOAT_BOUNDS[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Refused(f"{name} must be a number, got {_show(value)}")
    if not (math.isfinite(value) and low < value <= high):
        raise _Refused(f"{name} must be a finite number in ({low:g}, {high:g}], got {_show(value)}")
    return float(value)


def _check_fields(values: Mapping[str, Any]) -> None:
    """Type, range and cross-field checks of a config's values; raises `_Refused`."""
    for name in INT_BOUNDS:
        if name != "sliding_window" or values[name] is not None:
            _check_int(name, values[name])
    for name in FLOAT_BOUNDS:
        _check_float(name, values[name])
    if not isinstance(values["tie_word_embeddings"], bool):
        raise _Refused(f"tie_word_embeddings must be true or false, got {_show(values['tie_word_embeddings'])}")
    if values["num_experts_per_tok"] > values["num_local_experts"]:
        raise _Refused(
            f"num_experts_per_tok={values['num_experts_per_tok']} must be between 1 and "
            f"num_local_experts={values['num_local_experts']}")
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise _Refused(
            f"num_attention_heads={values['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads={values['num_key_value_heads']} (grouped-query attention needs it)")
    if values["head_dim"] % 2:
        raise _Refused(f"head_dim={values['head_dim']} must be even for rotary embeddings")


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
        try:
            _check_fields(vars(self))
        except _Refused as exc:
            raise MixexportError(f"config: {exc}") from None
        for name in FLOAT_BOUNDS:  # config.json may spell them as integers (rope_theta: 1000000)
            object.__setattr__(self, name, float(getattr(self, name)))
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
    def from_hf_dict(cls, raw: dict[str, Any], source: str = CONFIG_FILE) -> "MixtralConfig":
        """Parse a Hugging Face `config.json` dict, refusing what the reference does not implement.

        Args:
            raw: the parsed JSON object.
            source: names the file in errors.

        Raises:
            MixexportError: "`source`: `field` ...", for the first field that is missing, of the
                wrong type, out of range (see INT_BOUNDS, FLOAT_BOUNDS) or not implemented.
        """
        try:
            values = _parse_hf_dict(raw)
            _check_fields(values)
        except _Refused as exc:
            raise MixexportError(f"{source}: {exc}") from None
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "MixtralConfig":
        """Read and parse a `config.json` (a regular file of at most MAX_CONFIG_BYTES)."""
        path = Path(path)
        if not os.path.lexists(path):  # a broken symlink exists: opening it says so
            raise MixexportError(f"{path} not found: a checkpoint directory needs a config.json")
        return cls.from_hf_dict(read_json_object(path, MAX_CONFIG_BYTES), str(path))

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


def _parse_hf_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """The MixtralConfig fields from a config.json object; raises `_Refused`.

    Only what is needed to compute a value (e.g. head_dim = hidden_size // heads) is type-checked
    here; `_check_fields` checks the rest.
    """
    def refuse(field: str, value: Any, why: str) -> _Refused:
        return _Refused(f"{field}={cut(repr(value))} is not supported: {why}")

    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or ["MixtralForCausalLM"]
    if model_type != "mixtral":
        raise refuse("model_type", model_type, "mixexport exports Mixtral-family decoders (model_type 'mixtral')")
    if not isinstance(architectures, list) or "MixtralForCausalLM" not in architectures:
        raise refuse("architectures", architectures, "expected a list holding MixtralForCausalLM")

    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise refuse("hidden_act", hidden_act, "Mixtral experts use SiLU; other activations are not implemented")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field) not in (None, False):
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

    # transformers 5 writes "dtype", older versions "torch_dtype"; null means absent.
    dtype = next((raw[key] for key in ("dtype", "torch_dtype") if raw.get(key) is not None), "float32")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise refuse("dtype", dtype, f"use {', '.join(DTYPES)}")

    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_local_experts", "num_experts_per_tok", "vocab_size")
    missing = [name for name in required if name not in raw]
    if missing:
        raise _Refused(f"missing required field(s) {', '.join(missing)}")

    heads = _check_int("num_attention_heads", raw["num_attention_heads"])
    head_dim = raw.get("head_dim")
    if head_dim is None:
        hidden = _check_int("hidden_size", raw["hidden_size"])
        if hidden % heads:
            raise refuse("head_dim", None, f"hidden_size={hidden} is not a multiple of "
                         f"num_attention_heads={heads}; set head_dim explicitly")
        head_dim = hidden // heads
    kv_heads = raw.get("num_key_value_heads")  # null or absent: one KV head per query head

    return dict(
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else kv_heads,
        head_dim=head_dim,
        num_local_experts=raw["num_local_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"],
        vocab_size=raw["vocab_size"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=1e6 if rope_theta is None else rope_theta,
        sliding_window=raw.get("sliding_window"),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        dtype=dtype,
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
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
