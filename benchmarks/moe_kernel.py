"""Benchmark the Triton MoE pipeline on one Mixtral 8x7B MoE layer (H 4096, I 14336, E 8, K 2).

Needs an NVIDIA GPU (sm_80 or newer) with about 4 GB free, torch with CUDA and triton
(`pip install 'mixexport[kernels]'`), and TRITON_INTERPRET unset. Without a GPU it prints one line
and exits with status 1.

    python benchmarks/moe_kernel.py [--dtype fp16|bf16] [--tokens 1,8,64,512] [--peak-gbps 3350]

For each token count it prints the fused pipeline's time, the bytes it must move at least (the
weights of the experts the batch routes to, plus x and the output), the achieved GB/s, the share of
the GPU's DRAM bandwidth that is (the roofline: up to about a thousand tokens per expert the layer
is bandwidth bound), and the same for `mixexport.model.moe.moe_reference` in torch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2
# Peak DRAM bandwidth in GB/s by device name, for drivers that do not report clock and bus width.
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
             "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "RTX 4090": 1008, "A10": 600}


def peak_gbps(override: float | None) -> float:
    """The GPU's DRAM bandwidth in GB/s: the override, else clock x bus width, else the name table."""
    if override:
        return override
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for name, gbps in PEAK_GBPS.items():
        if name in props.name:
            return gbps
    sys.exit(f"unknown peak bandwidth for {props.name}: pass --peak-gbps")


def routed_experts(logits: torch.Tensor) -> int:
    """How many experts the batch routes at least one token to (their weights must be read)."""
    return torch.topk(logits, TOP_K, dim=-1).indices.unique().numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--tokens", default="1,8,64,512", help="comma-separated token counts N")
    parser.add_argument("--peak-gbps", type=float, default=None, help="DRAM bandwidth of the GPU, GB/s")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/moe_kernel.py needs an NVIDIA GPU; torch.cuda.is_available() is False", file=sys.stderr)
        sys.exit(1)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks/moe_kernel.py times compiled kernels: unset TRITON_INTERPRET", file=sys.stderr)
        sys.exit(1)

    import triton.testing

    from mixexport.kernels import fused_moe
    from mixexport.model.moe import moe_reference

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    peak = peak_gbps(args.peak_gbps)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w_gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", dtype=dtype, generator=gen) / HIDDEN**0.5
    w_down = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", dtype=dtype, generator=gen) / INTER**0.5
    weight_bytes = (w_gate_up[0].numel() + w_down[0].numel()) * w_gate_up.element_size()
    print(f"{torch.cuda.get_device_name()}  peak {peak:.0f} GB/s  {args.dtype}  H={HIDDEN} I={INTER} "
          f"E={EXPERTS} K={TOP_K}")
    print(f"{'N':>5} {'experts':>7} {'MB':>8} | {'triton ms':>9} {'GB/s':>7} {'%peak':>6} | "
          f"{'torch ms':>9} {'GB/s':>7} {'%peak':>6} | {'rel err':>8}")
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=dtype, generator=gen)
        logits = torch.randn(num_tokens, EXPERTS, device="cuda", generator=gen)
        experts = routed_experts(logits)
        # The least the layer must move: each routed expert's weights once, x read, the output written.
        nbytes = experts * weight_bytes + 2 * x.numel() * x.element_size()
        # do_bench clears L2 between runs, so every run streams the weights from DRAM.
        fused_ms = triton.testing.do_bench(lambda x=x, logits=logits: fused_moe(x, logits, w_gate_up, w_down, TOP_K))
        torch_ms = triton.testing.do_bench(lambda x=x, logits=logits: moe_reference(x, logits, w_gate_up, w_down, TOP_K))
        ref = moe_reference(x, logits, w_gate_up, w_down, TOP_K).float()
        err = ((fused_moe(x, logits, w_gate_up, w_down, TOP_K).float() - ref).abs().max() / ref.abs().max()).item()
        fused_gbps, torch_gbps = nbytes / fused_ms / 1e6, nbytes / torch_ms / 1e6
        print(f"{num_tokens:>5} {experts:>7} {nbytes / 1e6:>8.1f} | {fused_ms:>9.3f} {fused_gbps:>7.0f} "
              f"{100 * fused_gbps / peak:>5.1f}% | {torch_ms:>9.3f} {torch_gbps:>7.0f} {100 * torch_gbps / peak:>5.1f}% "
              f"| {err:>8.1e}")


if __name__ == "__main__":
    main()
