"""Expert quantization accuracy and cost: `mixexport.quant` against the plain absmax scheme, side by side.

    python benchmarks/quant_accuracy.py [--steps 32] [--prompt 32] [--prefill 4 128] [--timing-repeats 2]
                                        [--skip-timing]

In one process (torch 2 threads, 1 for the timing):
1. Weight reconstruction error, mean((W - W')**2) / mean(W**2), on a 2048x4096 Gaussian matrix, a
   Student-t (4 degrees of freedom, heavier tails) one, and the `mid` checkpoint's experts.
2. Top-1 agreement with the full-precision reference over --steps teacher-forced decode steps at
   batch 1 on `mid` (decode_speed.py's model: same config, seed, prompt and forcing), counted over
   the first 16 steps (the issue's target window) and over all; plus the logits' RMS error relative
   to the reference's RMS. Each row is the reference decoder with dequantized experts, which is
   what an artifact of that scheme computes (its parity check (a) holds it to round-off). The same
   over every position of a --prefill B S prefill of random tokens (512 positions by default): a
   16- or 32-step count moves by several steps between rows whose logits error barely differs.
3. Seconds to quantize one 8x7B-shaped expert (w1, w3 [14336, 4096], w2 [4096, 14336], bf16, bf16
   scales), old and new interleaved, one torch thread, median of --timing-repeats.
4. Active weight bytes per decoded token at batch 1 (decode_speed.active_bytes) and the bandwidth
   bound speedup over fp32 they allow, for mid (fp32 non-expert weights) and 8x7B (fp16).

Rows: `absmax` is the scheme before the search (scale absmax/qmax, q in [-qmax, qmax], scale
rounded to the model dtype); `searched` is `mixexport.quant.quantize`; `q8_0` and `q4_0` emulate
llama.cpp's weight formats (blocks of 32; q4_0: d = the signed max-magnitude value / -8, q in
[-8, 7]) on the weights only (llama.cpp also quantizes the activations to 8 bits in its dot products).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import RefRunner, active_bytes, greedy_tokens, make_config  # noqa: E402

from mixexport.quant import QuantScheme, dequantize, quantize  # noqa: E402

THREADS = 2
TARGET_STEPS = 16  # the top-1 targets are over 16 teacher-forced steps
SCHEMES = {"int8": QuantScheme(8), "int4-g32": QuantScheme(4, 32), "int4-g64": QuantScheme(4, 64),
           "int4-g128": QuantScheme(4, 128)}


def absmax_quantize(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype):
    """`quantize` as it was before the search (same stored layout): scale absmax/qmax rounded to
    `scale_dtype`, q in [-qmax, qmax]. The baseline of every comparison here."""
    *lead, n, k = weight.shape
    g = scheme.group(k)
    w = weight.to(torch.float32).reshape(*lead, n, k // g, g)
    scale = (w.abs().amax(dim=-1) / scheme.qmax).to(scale_dtype)
    s = scale.to(torch.float32).unsqueeze(-1)
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1)), 0).clamp(-scheme.qmax, scheme.qmax)
    stored = (q.to(torch.int16) + scheme.offset).to(torch.uint8).reshape(*lead, n, k)
    if scheme.bits == 4:
        stored = stored[..., 0::2] | (stored[..., 1::2] << 4)
    return stored.contiguous(), scale.contiguous()


def absmax(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return dequantize(*absmax_quantize(w, scheme, w.dtype), scheme)


def searched(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return dequantize(*quantize(w, scheme, w.dtype), scheme)


def llama_cpp(w: torch.Tensor, bits: int) -> torch.Tensor:
    """W' of llama.cpp's q8_0 (bits 8: d = absmax/127) or q4_0 (bits 4: d = max/-8, q in [-8, 7])."""
    x = w.float().reshape(*w.shape[:-1], -1, 32)
    if bits == 8:
        d = x.abs().amax(-1, keepdim=True) / 127
        lo, hi = -127, 127
    else:
        d = x.gather(-1, x.abs().argmax(-1, keepdim=True)) / -8
        lo, hi = -8, 7
    return (torch.where(d != 0, torch.round(x / torch.where(d != 0, d, 1)), 0).clamp(lo, hi) * d).reshape(w.shape)


# (row label, function w -> W') of every row compared
ROWS = [("int8 absmax", lambda w: absmax(w, SCHEMES["int8"])),
        ("int8 searched", lambda w: searched(w, SCHEMES["int8"])),
        ("q8_0 (llama.cpp, weights)", lambda w: llama_cpp(w, 8)),
        ("q4_0 (llama.cpp, weights)", lambda w: llama_cpp(w, 4))]
ROWS += [(f"{name} {kind}", lambda w, s=SCHEMES[name], f=f: f(w, s))
         for name in ("int4-g32", "int4-g64", "int4-g128") for kind, f in (("absmax", absmax), ("searched", searched))]


def relative_mse(w: torch.Tensor, back: torch.Tensor) -> float:
    return float(((back - w.float()) ** 2).mean() / (w.float() ** 2).mean())


def reconstruction(mid_runner) -> None:
    g = torch.Generator().manual_seed(0)
    weights = {"gaussian": torch.randn(2048, 4096, generator=g),
               "student-t(4)": torch.distributions.StudentT(4.0).sample((2048, 4096))}
    layer = mid_runner.model.layers[0].moe
    weights["mid L0 w_gate_up"] = layer.w_gate_up.detach().flatten(0, 1)  # rows of K = H
    weights["mid L0 w_down"] = layer.w_down.detach().flatten(0, 1)  # rows of K = I
    print("\n== weight reconstruction: mean((W - W')**2) / mean(W**2) ==")
    print(f"{'row':<28}" + "".join(f"{name:>22}" for name in weights))
    for label, fn in ROWS:
        print(f"{label:<28}" + "".join(f"{relative_mse(w, fn(w)):>22.3e}" for w in weights.values()), flush=True)


def relative_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out - ref) ** 2).mean().sqrt() / (ref ** 2).mean().sqrt())


@torch.no_grad()
def agreement(ckpt: Path, steps: int, prompt: int, prefill_shape: tuple[int, int]) -> None:
    """Sections 1 and 2 of the module docstring, and the same agreement over the positions of a
    batched prefill of random tokens (`prefill_shape` [B, S]): teacher forcing too (every
    position's input is given), over many more positions than the decode run, so a difference
    between two rows can be told from noise (binomial standard error in the table)."""
    runner = RefRunner(ckpt)
    vocab = runner.model.config.vocab_size
    forced = greedy_tokens(runner, prompt, steps, vocab)
    targets = torch.cat(forced[1:]).flatten()  # [steps] the reference's token after each step
    reference = logits_along(runner, forced, prompt, steps, vocab)
    ids = torch.randint(3, vocab, prefill_shape, generator=torch.Generator().manual_seed(1))
    reference_prefill = prefill_logits(runner, ids)
    full = {n: (layer.moe.w_gate_up.detach().clone(), layer.moe.w_down.detach().clone())
            for n, layer in enumerate(runner.model.layers)}
    reconstruction(runner)
    positions = ids.numel()
    print(f"\n== mid: top-1 agreement with the full-precision reference; decode: {steps} teacher-forced steps, "
          f"batch 1, prompt {prompt}; prefill: {prefill_shape[0]} x {prefill_shape[1]} random tokens ==")
    print(f"{'row':<28} {'first ' + str(TARGET_STEPS):>10} {'all ' + str(steps):>8} {'logits rel RMS':>15}"
          f" {'prefill top-1':>20} {'prefill rel RMS':>16}")
    for label, fn in ROWS:
        for n, layer in enumerate(runner.model.layers):
            layer.moe.w_gate_up.copy_(fn(full[n][0]))
            layer.moe.w_down.copy_(fn(full[n][1]))
        logits = logits_along(runner, forced, prompt, steps, vocab)
        agree = (logits.argmax(-1) == targets).tolist()
        out_prefill = prefill_logits(runner, ids)
        share = float((out_prefill.argmax(-1) == reference_prefill.argmax(-1)).float().mean())
        error = (share * (1 - share) / positions) ** 0.5
        print(f"{label:<28} {sum(agree[:TARGET_STEPS]):>7}/{TARGET_STEPS} {sum(agree):>5}/{steps} "
              f"{relative_rms(logits, reference):>15.4f} {share:>13.3f} ± {error:.3f} "
              f"{relative_rms(out_prefill, reference_prefill):>16.4f}", flush=True)
    for n, layer in enumerate(runner.model.layers):
        layer.moe.w_gate_up.copy_(full[n][0])
        layer.moe.w_down.copy_(full[n][1])


def prefill_logits(runner, ids: torch.Tensor) -> torch.Tensor:
    """[B, S, V] logits of one prefill of `ids` [B, S] (all positions real)."""
    b, seq = ids.shape
    logits, _ = runner.prefill(ids, torch.ones(b, seq, dtype=torch.int64), torch.arange(seq)[None].expand(b, seq))
    return logits


def logits_along(runner, forced, prompt: int, steps: int, vocab: int) -> torch.Tensor:
    """[steps, V] logits of each teacher-forced decode step (greedy_tokens' feeds)."""
    rows = []

    class Tap:
        def prefill(self, ids, mask, pos):
            return runner.prefill(ids, mask, pos)

        def step(self, ids, mask, pos, state):
            logits, state = runner.step(ids, mask, pos, state)
            rows.append(logits[0, -1])
            return logits, state

    greedy_tokens(Tap(), prompt, steps, vocab, forced[:-1])
    return torch.stack(rows)


def timing(repeats: int) -> None:
    """Seconds per 8x7B-shaped expert, absmax and searched interleaved in this process, with one
    torch thread: the quantizer's own cost. (With 2 threads on a loaded machine the searched one's
    many cache-sized ops each wait for the other thread to be scheduled: its wall time then grew
    6-13x where one thread's did not.)"""
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(14336, 4096, generator=g).to(torch.bfloat16) for _ in range(2)]
    mats.append(torch.randn(4096, 14336, generator=g).to(torch.bfloat16))
    torch.set_num_threads(1)
    print(f"\n== seconds to quantize one 8x7B-shaped expert (3 x 14336x4096 bf16), 1 thread, median of {repeats}; "
          f"load average {os.getloadavg()[0]:.1f} at start ==")
    for name in ("int8", "int4-g32"):
        scheme = SCHEMES[name]
        times = {"absmax": [], "searched": []}
        for _ in range(repeats):
            for kind, fn in (("absmax", absmax_quantize), ("searched", quantize)):
                t = time.perf_counter()
                for w in mats:
                    fn(w, scheme, torch.bfloat16)
                times[kind].append(time.perf_counter() - t)
        old, new = (statistics.median(times[k]) for k in ("absmax", "searched"))
        print(f"{name:<9} absmax {old:6.2f} s   searched {new:6.2f} s   ratio {new / old:5.2f}   "
              f"load average now {os.getloadavg()[0]:.1f}", flush=True)
    torch.set_num_threads(THREADS)


def bandwidth_bounds() -> None:
    """Active bytes per token at batch 1 and the bound speedup over fp32 experts they allow."""
    from mixexport.checkpoint import preset
    configs = {"mid (fp32)": make_config("mid"), "8x7B (fp32)": preset("mixtral-8x7b").replace(dtype="float32"),
               "8x7B (fp16)": preset("mixtral-8x7b").replace(dtype="float16")}
    print("\n== active weight bytes per decoded token, batch 1 (top-2 of 8 experts; attention, router, norms, "
          "lm_head and the embedding row in the model dtype) ==")
    for label, c in configs.items():
        full = active_bytes(c, 1)
        cells = [f"full {full / 1e6:8.1f} MB"]
        for name in ("int8", "int4-g32"):
            b = active_bytes(c, 1, SCHEMES[name])
            cells.append(f"{name} {b / 1e6:8.1f} MB (bound x{full / b:4.2f} vs full)")
        print(f"{label:<12} " + "   ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--prefill", type=int, nargs=2, default=[4, 128], metavar=("B", "S"),
                    help="batch and length of the random-token prefill whose positions are also compared")
    ap.add_argument("--timing-repeats", type=int, default=2)
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {THREADS} threads; load average {os.getloadavg()}")
    from mixexport.checkpoint import write_checkpoint
    with tempfile.TemporaryDirectory(prefix="mixexport-quant-") as tmp:
        ckpt = write_checkpoint(Path(tmp) / "mid", make_config("mid"), seed=0)
        agreement(ckpt, args.steps, args.prompt, tuple(args.prefill))
    bandwidth_bounds()
    if not args.skip_timing:
        timing(args.timing_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
