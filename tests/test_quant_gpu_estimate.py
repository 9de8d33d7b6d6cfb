"""benchmarks/quant_gpu_estimate.py's arithmetic against the published sizes of Mixtral."""

import importlib.util
from pathlib import Path

from mixexport.checkpoint import preset
from mixexport.quant import QuantScheme

_spec = importlib.util.spec_from_file_location(
    "quant_gpu_estimate", Path(__file__).resolve().parents[1] / "benchmarks" / "quant_gpu_estimate.py")
estimate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(estimate)


def test_fp16_sizes_are_mixtrals_published_parameter_counts():
    # Mixtral 8x7B: 46.7B parameters, 12.9B active per token; 8x22B: 141B, 39B active.
    for name, total, active in (("mixtral-8x7b", 46.7, 12.9), ("mixtral-8x22b", 141, 39)):
        r = estimate.row(preset(name), None, context=0, reserve_gb=0)
        assert abs(r["weights_gb"] / 2 - total) / total < 0.01
        assert abs(r["bytes_per_token_gb"] / 2 - active) / active < 0.03


def test_quantized_experts_shrink_by_their_bits_plus_scales():
    c = preset("mixtral-8x7b")
    fp16 = estimate.expert_bytes(c, None)
    assert estimate.expert_bytes(c, QuantScheme(8)) == fp16 // 2 + 2 * (2 * c.intermediate_size + c.hidden_size)
    int4 = estimate.expert_bytes(c, QuantScheme(4, 32))
    assert int4 == fp16 // 4 + fp16 // 32  # half a byte per weight, a 2-byte scale per 32 weights
    fits = {s: estimate.row(c, s, 4096, 4)["kv_tokens"] > 0 for s in estimate.SCHEMES}
    assert fits == {None: False, QuantScheme(8): True, QuantScheme(4, 32): True, QuantScheme(4, 128): True}
