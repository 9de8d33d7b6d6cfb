"""The MixtralMoE plugin contract, read from `plugin_contract.json`: the one source the `trt`
lowering, the CPU stand-in implementation, the C++ plugin's field list and the docs agree with."""

from __future__ import annotations

import functools
import json
from pathlib import Path

CONTRACT_PATH = Path(__file__).with_name("plugin_contract.json")


@functools.lru_cache(maxsize=None)
def plugin_contract() -> dict:
    return json.loads(CONTRACT_PATH.read_text())


def input_names() -> list[str]:
    return [spec["name"] for spec in plugin_contract()["inputs"]]


def attribute_names() -> list[str]:
    return [spec["name"] for spec in plugin_contract()["attributes"]]
