"""Shared fixtures: tiny configs and checkpoints written once per test session.

Checkpoints are written with `mixexport.checkpoint.write_checkpoint` (random weights, Hugging Face
layout) into a session temp dir and cached by (config, seed, shard size), so every test that needs
the same checkpoint reads the same files. Tests that damage a checkpoint copy it first
(`checkpoint_copy`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mixexport.checkpoint import MixtralConfig, write_checkpoint

# A tiny config with every feature on the common path: GQA (4 query heads on 2 KV heads),
# head_dim != hidden/heads, 4 experts, top-2, two layers, untied embeddings.
TINY = MixtralConfig(
    hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    vocab_size=97, rope_theta=1e4, dtype="float32", max_position_embeddings=256)

# Small enough that the tiny config's tensors spread over several shards.
SMALL_SHARD_BYTES = 40_000


@pytest.fixture(scope="session")
def tiny_config() -> MixtralConfig:
    return TINY


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """`make(config, seed=0, max_shard_size=None) -> Path`, writing each distinct checkpoint once.

    The returned directories are shared across the session: do not modify them.
    """
    cache: dict[tuple, Path] = {}

    def make(config: MixtralConfig, seed: int = 0, max_shard_size: int | None = None) -> Path:
        key = (config, seed, max_shard_size)
        if key not in cache:
            out = tmp_path_factory.mktemp("ckpt") / "model"
            kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            cache[key] = write_checkpoint(out, config, seed=seed, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    """TINY as a single `model.safetensors`."""
    return checkpoint_factory(TINY)


@pytest.fixture(scope="session")
def tiny_sharded_checkpoint(checkpoint_factory) -> Path:
    """TINY in several shards with `model.safetensors.index.json`."""
    return checkpoint_factory(TINY, max_shard_size=SMALL_SHARD_BYTES)


@pytest.fixture
def checkpoint_copy(tmp_path):
    """`copy(path) -> Path`: a private copy of a shared checkpoint, safe to damage."""
    def copy(path: Path) -> Path:
        return Path(shutil.copytree(path, tmp_path / path.name))

    return copy


ORT_MOE_SOURCES = Path(__file__).resolve().parent.parent / "plugins" / "ort_moe"


@pytest.fixture(scope="session")
def ort_moe_library(tmp_path_factory) -> Path:
    """The ort target's CPU MoE op library (plugins/ort_moe): $MIXEXPORT_ORT_MOE_LIB (CI: its CMake
    build), else compiled here with c++ against onnxruntime's headers in $MIXEXPORT_ORT_INCLUDE.
    Skipped without either, except in CI (CI=true), which must build it."""
    import os
    import subprocess

    built = os.environ.get("MIXEXPORT_ORT_MOE_LIB")
    if built:
        return Path(built)
    include = os.environ.get("MIXEXPORT_ORT_INCLUDE")
    compiler = shutil.which("c++")
    if not include or not compiler:
        why = ("the ort MoE op library is not built: set MIXEXPORT_ORT_MOE_LIB to it, or MIXEXPORT_ORT_INCLUDE to "
               "onnxruntime's C++ API headers (plugins/ort_moe/CMakeLists.txt says where they come from)"
               + ("" if compiler else "; and no c++ compiler is on PATH"))
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    out = tmp_path_factory.mktemp("ort_moe") / "libmixexport_ort_moe.so"
    subprocess.run([compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra",
                    "-Werror", "-Wno-psabi", f"-I{include}", str(ORT_MOE_SOURCES / "moe_cpu_op.cpp"),
                    str(ORT_MOE_SOURCES / "moe_cpu_dot.cpp"), "-o", str(out)], check=True)
    return out
