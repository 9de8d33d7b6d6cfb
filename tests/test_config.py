"""config.json parsing: what is accepted, how it is read, and every refusal's message."""

from __future__ import annotations

import json

import pytest

from mixexport.checkpoint import PRESETS, Checkpoint, MixtralConfig, preset
from mixexport.errors import MixexportError


def hf_dict(**changes) -> dict:
    """A valid tiny Mixtral config.json, with fields changed (a value of ... deletes the field)."""
    raw = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "dtype": "float32",
    }
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not ...}


@pytest.fixture
def checkpoint_with_config(tmp_path, tiny_checkpoint):
    """`make(text) -> dir`: the tiny checkpoint's weights with config.json replaced by `text`."""
    def make(text: str):
        (tmp_path / "model.safetensors").symlink_to(tiny_checkpoint / "model.safetensors")
        (tmp_path / "config.json").write_text(text)
        return tmp_path

    return make


# -- what is read ----------------------------------------------------------------------------------

def test_head_dim_null_defaults_to_hidden_over_heads():
    assert MixtralConfig.from_hf_dict(hf_dict(head_dim=None)).head_dim == 16
    assert MixtralConfig.from_hf_dict(hf_dict(head_dim=...)).head_dim == 16


def test_explicit_head_dim_is_kept_even_when_not_hidden_over_heads():
    assert MixtralConfig.from_hf_dict(hf_dict(head_dim=24)).head_dim == 24


def test_head_dim_null_with_indivisible_hidden_is_refused():
    with pytest.raises(MixexportError, match=r"head_dim=None .*hidden_size=66 is not a multiple"):
        MixtralConfig.from_hf_dict(hf_dict(hidden_size=66, head_dim=None))


def test_rope_theta_at_top_level():
    assert MixtralConfig.from_hf_dict(hf_dict(rope_theta=12345.0)).rope_theta == 12345.0


def test_rope_theta_inside_rope_parameters():
    raw = hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 54321.0})
    assert MixtralConfig.from_hf_dict(raw).rope_theta == 54321.0


def test_rope_parameters_win_over_top_level_rope_theta():
    # transformers 5 reads rope_parameters; a stale top-level key must not override it.
    raw = hf_dict(rope_theta=1.0e4, rope_parameters={"rope_type": "default", "rope_theta": 5.0e5})
    assert MixtralConfig.from_hf_dict(raw).rope_theta == 5.0e5


def test_rope_theta_defaults_to_mixtral_value():
    assert MixtralConfig.from_hf_dict(hf_dict()).rope_theta == 1e6


def test_num_key_value_heads_defaults_to_heads():
    assert MixtralConfig.from_hf_dict(hf_dict(num_key_value_heads=...)).num_key_value_heads == 4


def test_torch_dtype_key_is_read():
    assert MixtralConfig.from_hf_dict(hf_dict(dtype=..., torch_dtype="bfloat16")).dtype == "bfloat16"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_config_json(name):
    config = preset(name)
    assert MixtralConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config


def test_unknown_preset():
    with pytest.raises(MixexportError, match=r"unknown preset 'nope'; choose one of tiny"):
        preset("nope")


# -- refusals, through a checkpoint directory -----------------------------------------------------

def test_config_json_missing(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MixexportError, match=r"config\.json not found: a checkpoint directory needs a config\.json"):
        Checkpoint(tmp_path)


def test_config_json_invalid(checkpoint_with_config):
    path = checkpoint_with_config('{"model_type": "mixtral",')
    with pytest.raises(MixexportError, match=r"config\.json: not valid JSON"):
        Checkpoint(path)


def test_config_json_not_an_object(checkpoint_with_config):
    path = checkpoint_with_config("[1, 2]")
    with pytest.raises(MixexportError, match=r"config\.json: must hold a JSON object, found list"):
        Checkpoint(path)


def test_unsupported_model_type(checkpoint_with_config):
    path = checkpoint_with_config(json.dumps(hf_dict(model_type="llama")))
    with pytest.raises(MixexportError, match=r"config\.json: model_type='llama' is not supported"):
        Checkpoint(path)


def test_rope_parameters_yarn_refused(checkpoint_with_config):
    raw = hf_dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    path = checkpoint_with_config(json.dumps(raw))
    with pytest.raises(MixexportError, match=r"rope_parameters\.rope_type='yarn' is not supported: only default"):
        Checkpoint(path)


def test_rope_scaling_linear_refused(checkpoint_with_config):
    raw = hf_dict(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    path = checkpoint_with_config(json.dumps(raw))
    with pytest.raises(MixexportError, match=r"rope_scaling=\{'type': 'linear', 'factor': 2\.0\} is not supported"):
        Checkpoint(path)


def test_hidden_act_gelu_refused(checkpoint_with_config):
    path = checkpoint_with_config(json.dumps(hf_dict(hidden_act="gelu")))
    with pytest.raises(MixexportError, match=r"hidden_act='gelu' is not supported: Mixtral experts use SiLU"):
        Checkpoint(path)


def test_top_k_above_experts_refused(checkpoint_with_config):
    path = checkpoint_with_config(json.dumps(hf_dict(num_experts_per_tok=5)))
    with pytest.raises(MixexportError,
                       match=r"num_experts_per_tok=5 must be between 1 and num_local_experts=4"):
        Checkpoint(path)


def test_top_k_zero_refused(checkpoint_with_config):
    path = checkpoint_with_config(json.dumps(hf_dict(num_experts_per_tok=0)))
    with pytest.raises(MixexportError,
                       match=r"config\.json: num_experts_per_tok must be between 1 and 1024, got 0"):
        Checkpoint(path)


def test_missing_required_field_refused(checkpoint_with_config):
    path = checkpoint_with_config(json.dumps(hf_dict(vocab_size=...)))
    with pytest.raises(MixexportError, match=r"missing required field\(s\) vocab_size"):
        Checkpoint(path)


def test_attention_bias_refused():
    with pytest.raises(MixexportError, match=r"attention_bias=True is not supported"):
        MixtralConfig.from_hf_dict(hf_dict(attention_bias=True))


def test_gqa_heads_not_a_multiple_refused():
    with pytest.raises(MixexportError, match=r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        MixtralConfig.from_hf_dict(hf_dict(num_key_value_heads=3))


def test_unsupported_dtype_refused():
    with pytest.raises(MixexportError, match=r"dtype='float8_e4m3fn' is not supported"):
        MixtralConfig.from_hf_dict(hf_dict(dtype="float8_e4m3fn"))
