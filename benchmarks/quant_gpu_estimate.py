"""Paper numbers (estimates, nothing measured) for quantized experts on one 80 GB GPU.

    python benchmarks/quant_gpu_estimate.py [--presets mixtral-8x7b mixtral-8x22b] [--context 4096]
                                            [--reserve-gb 4]

For each preset's real shapes and each experts scheme (the model dtype float16, and mixexport's
int8 per row and int4 per group of 32/128, `mixexport/quant.py`; attention, router, norms,
embedding and lm_head stay float16) it prints:

- weights GB: the artifact's weight bytes (experts' stored bytes + their fp16 scales + the rest);
- fits 80 GB: whether the weights leave room on one 80 GB GPU, and the KV-cache tokens that room
  holds after `--reserve-gb` for activations and workspace (an assumption, not a measurement);
- bytes/token: what one batch-1 decode step must read: the top-k experts of every layer, every
  non-expert weight but the embedding (one row of it), and the KV cache of `--context` tokens;
- bandwidth-bound ms/token: bytes/token over the GPU's peak HBM bandwidth from its spec sheet
  (H100 SXM 3.35 TB/s, A100 SXM 80 GB 2.04 TB/s): a lower bound on the decode step, which real
  kernels reach only in part. No GPU ran this: these are arithmetic, labelled as estimates.
"""

from __future__ import annotations

import argparse

from mixexport.checkpoint import MixtralConfig, preset
from mixexport.quant import QuantScheme

GB = 1e9
FP16 = 2
GPU_MEMORY_GB = 80
# Peak HBM bandwidth from NVIDIA's spec sheets, bytes/s.
GPUS = {"H100 SXM": 3.35e12, "A100 SXM 80GB": 2.039e12}
SCHEMES = [None, QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 128)]


def expert_matrices(c: MixtralConfig) -> list[tuple[int, int]]:
    """One expert's weights as (rows N, columns K): w1 and w3 [I, H], w2 [H, I]."""
    return [(c.intermediate_size, c.hidden_size)] * 2 + [(c.hidden_size, c.intermediate_size)]


def expert_bytes(c: MixtralConfig, scheme: QuantScheme | None) -> int:
    """One expert's stored bytes: fp16 weights, or the scheme's codes plus fp16 scales."""
    total = 0
    for n, k in expert_matrices(c):
        if scheme is None:
            total += n * k * FP16
        else:
            total += n * k * scheme.bits // 8 + n * (k // scheme.group(k)) * FP16
    return total


def non_expert_params(c: MixtralConfig) -> dict[str, int]:
    """The weights that stay in the model dtype, by part (parameters)."""
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = h * q + 2 * h * kv + q * h + h * c.num_local_experts + 2 * h  # q k v o, router, 2 norms
    return {"layers": c.num_hidden_layers * per_layer, "embedding": c.vocab_size * h,
            "lm_head": c.vocab_size * h, "final_norm": h}


def kv_bytes_per_token(c: MixtralConfig) -> int:
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * FP16


def row(c: MixtralConfig, scheme: QuantScheme | None, context: int, reserve_gb: float) -> dict:
    rest = non_expert_params(c)
    experts = c.num_hidden_layers * c.num_local_experts * expert_bytes(c, scheme)
    weights = experts + sum(rest.values()) * FP16
    active = (c.num_hidden_layers * c.num_experts_per_tok * expert_bytes(c, scheme)
              + (rest["layers"] + rest["lm_head"] + rest["final_norm"] + c.hidden_size) * FP16)
    per_token = active + context * kv_bytes_per_token(c)
    room = GPU_MEMORY_GB * GB - weights - reserve_gb * GB
    return {"scheme": "fp16" if scheme is None else scheme.name, "weights_gb": weights / GB,
            "kv_tokens": int(room // kv_bytes_per_token(c)) if room > 0 else 0,
            "bytes_per_token_gb": per_token / GB,
            "ms": {gpu: 1e3 * per_token / bandwidth for gpu, bandwidth in GPUS.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["mixtral-8x7b", "mixtral-8x22b"])
    ap.add_argument("--context", type=int, default=4096, help="KV-cache tokens a decode step reads")
    ap.add_argument("--reserve-gb", type=float, default=4.0, help="GPU memory kept for activations/workspace")
    args = ap.parse_args()
    print("Estimates from the shapes (no GPU measured); bandwidth-bound = bytes/token / peak HBM bandwidth.")
    gpus = " | ".join(f"{gpu} ms/token" for gpu in GPUS)
    print(f"\n| preset | experts | weights GB | fits 80 GB (KV tokens) | bytes/token GB (context {args.context}) | {gpus} |")
    print("| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(GPUS))
    for name in args.presets:
        c = preset(name)
        for scheme in SCHEMES:
            if scheme is not None and scheme.refusal(c.hidden_size, c.intermediate_size):
                continue
            r = row(c, scheme, args.context, args.reserve_gb)
            fits = f"yes ({r['kv_tokens']:,})" if r["kv_tokens"] else "no"
            ms = " | ".join(f"{v:.2f}" for v in r["ms"].values())
            print(f"| {name} | {r['scheme']} | {r['weights_gb']:.1f} | {fits} | {r['bytes_per_token_gb']:.2f} | {ms} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
