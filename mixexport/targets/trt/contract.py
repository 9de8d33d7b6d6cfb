"""The MixtralMoE plugin contract, read from `plugin_contract.json`: the one source the `trt`
lowering, the CPU stand-in implementation, the C++ plugin's field list and the docs agree with.

A node with 16-bit experts has the inputs and attributes without `only_when` / `default`; a node with
weight-only quantized experts (quant_bits 8 or 4) has all of them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

CONTRACT_PATH = Path(__file__).with_name("plugin_contract.json")


@functools.lru_cache(maxsize=None)
def plugin_contract() -> dict:
    return json.loads(CONTRACT_PATH.read_text())


def input_names(quantized: bool = False) -> list[str]:
    """The node's inputs, in order: x, router_logits, w_gate_up, w_down (+ s_gate_up, s_down when quantized)."""
    return [spec["name"] for spec in plugin_contract()["inputs"] if quantized or "only_when" not in spec]


def attribute_names(quantized: bool = False) -> list[str]:
    """The node's plugin fields (+ quant_bits, group_size, which default to 0 when absent, when quantized)."""
    return [spec["name"] for spec in plugin_contract()["attributes"] if quantized or "default" not in spec]


def attribute_defaults() -> dict[str, int]:
    """The value of each attribute a node may leave out (quant_bits and group_size: 0)."""
    return {spec["name"]: spec["default"] for spec in plugin_contract()["attributes"] if "default" in spec}
