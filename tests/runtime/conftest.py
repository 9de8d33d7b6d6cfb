"""The artifacts the runtime tests run (built once per module, see artifacts.py)."""

import pytest

from runtime import artifacts


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    return artifacts.tiny_preset(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_written(tmp_path_factory):
    return artifacts.hf_written(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_preset_shared(tmp_path_factory):
    return artifacts.tiny_preset(tmp_path_factory, "shared")


@pytest.fixture(scope="module")
def hf_written_shared(tmp_path_factory):
    return artifacts.hf_written(tmp_path_factory, "shared")
