"""Prefill and per-token decode latency on CPU: our artifacts vs the PyTorch models, side by side.

    python benchmarks/decode_speed.py [--configs small mid] [--batches 1 8] [--steps 16]
                                      [--prompt 32] [--workdir DIR] [--skip-hf-onnx] [--quant int8 int4]
                                      [--dtypes float16]

For each config (the `small` preset, and `mid`: hidden 512, intermediate 1792, 8 layers, 8 heads,
2 KV heads, 8 experts, top-2, vocab 32000, fp32) it writes a random checkpoint, builds the
`portable` and `ort` targets with `mixexport build --no-validate`, and times, at each batch size,
a prefill of --prompt tokens and --steps greedy-style decode steps through the KV cache for:

- reference:      `mixexport.model.load_reference` (torch, our PyTorch reference)
- hf eager:       transformers `MixtralForCausalLM.from_pretrained` (attn eager, default experts)
- hf onnx (ort):  a plain `torch.onnx.export(..., dynamo=True)` of transformers' Mixtral with
                  `experts_implementation="batched_mm"`, run in onnxruntime
- ours portable / ours ort: the mixexport artifacts in onnxruntime (CPU EP); `ours ort` is built
                  for the CPU provider (the default, one If per expert); `ours ort fused` is the
                  same graph built with `--ort-provider cuda` (one com.microsoft.MoE per layer),
                  timed on CPU beside it
- ours portable fp16 / ours ort fp16: the same in float16 (--dtypes), which onnxruntime's x86 CPU
                  provider runs through float32 copies
- ours portable int8 / ours ort int4-g32 ...: the same, built with `--experts-quant` (--quant;
  int4 with group 32), each with its export time and artifact size, and its top-1 agreement with
  the reference over --steps teacher-forced decode steps at batch 1 (every step's input token is
  the reference's greedy token; a step agrees when both pick the same next token)

torch uses 2 threads, onnxruntime intra_op_num_threads=2. Decode ms is the median over --steps
steps (after 3 warmup steps), one new token per sequence per step. "x limit" compares with the
bandwidth limit of one step: active weight bytes / DRAM read bandwidth (torch sum over a 2 GiB
buffer with 1 and 2 threads, best of 5). At batch B the active expert bytes assume uniform
routing: each layer reads E * (1 - (1 - k/E)^B) distinct experts. The fp16 rows' limit is the float32
one: onnxruntime's x86 CPU provider reads float32 copies of their weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

THREADS = 2
WARMUP = 3
PREFILL_REPEATS = 3
TARGET_STEPS = 16  # the issue's top-1 agreement targets count 16 teacher-forced steps


# -- configs and machine -------------------------------------------------------------------------

def make_config(name: str):
    from mixexport.checkpoint import preset
    if name == "small":
        return preset("small")
    if name == "mid":
        return preset("small").replace(hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                       num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                                       dtype="float32")
    raise SystemExit(f"unknown config {name!r}")


def dram_bandwidth() -> float:
    """Read bandwidth in bytes/s: the best of 5 torch sums over a 2 GiB fp32 buffer, with 1 and 2
    threads. (numpy's pairwise sum is compute-bound on this VM, ~20 GB/s, and would make a "limit"
    that the artifacts beat.)"""
    buf = torch.ones(2 * 1024**3 // 4, dtype=torch.float32)
    best = float("inf")
    for threads in (1, THREADS):
        torch.set_num_threads(threads)
        for _ in range(5):
            t = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t)
    torch.set_num_threads(THREADS)
    del buf
    return 2 * 1024**3 / best


def active_bytes(c, batch: int, quant=None) -> float:
    """Weight bytes one decode step must read (one embedding row per sequence); `quant` (a QuantScheme):
    experts at bits/8 bytes per weight plus one model-dtype scale per group, the rest in the model dtype."""
    item = 4 if c.dtype == "float32" else 2
    H, I, E, K = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok
    attn = H * c.num_attention_heads * c.head_dim * 2 + H * c.num_key_value_heads * c.head_dim * 2
    experts = E * (1 - (1 - K / E) ** batch)
    per_expert = 3 * H * I * item
    if quant is not None:
        per_expert = 3 * H * I * quant.bits / 8 + item * (2 * I * H // quant.group(H) + H * I // quant.group(I))
    per_layer = item * (attn + H * E + 2 * H) + experts * per_expert
    return c.num_hidden_layers * per_layer + item * (c.vocab_size * H + H + batch * H)


def machine_info() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    import transformers
    return (f"machine: {os.cpu_count()} cores, {mem:.1f} GiB, {platform.platform()}\n"
            f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
            f"transformers {transformers.__version__}; torch threads {THREADS}, ORT intra_op {THREADS}")


# -- runners: each has prefill(ids, mask, pos) -> (last logits, state) and step(ids, mask, pos, state) --

class RefRunner:
    def __init__(self, ckpt_dir: Path):
        from mixexport.checkpoint import Checkpoint
        from mixexport.model import load_reference
        self.model = load_reference(Checkpoint(ckpt_dir))

    @torch.no_grad()
    def prefill(self, ids, mask, pos):
        logits, present = self.model(ids, mask, pos, self.model.empty_cache(ids.shape[0]))
        return logits, present

    @torch.no_grad()
    def step(self, ids, mask, pos, state):
        return self.model(ids, mask, pos, state)


class HFRunner:
    def __init__(self, ckpt_dir: Path):
        from transformers import MixtralForCausalLM
        self.model = MixtralForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()

    @torch.no_grad()
    def prefill(self, ids, mask, pos):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits, cache

    @torch.no_grad()
    def step(self, ids, mask, pos, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits, cache


class OrtRunner:
    """Any graph with mixexport's I/O names (our targets, and the plain HF export, named alike)."""

    def __init__(self, onnx_path: Path, num_layers: int, kv_heads: int, head_dim: int, profile: str | None = None):
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = profile
        self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.in_names = {i.name for i in self.sess.get_inputs()}
        past = next(i for i in self.sess.get_inputs() if i.name.startswith("past_key_values."))
        self.past_dtype = np.float16 if past.type == "tensor(float16)" else np.float32
        self.L, self.kvh, self.d = num_layers, kv_heads, head_dim

    def _run(self, ids, mask, pos, past):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(), **past}
        feed = {k: v for k, v in feed.items() if k in self.in_names}
        outs = dict(zip(self.out_names, self.sess.run(None, feed)))
        present = {f"past_key_values.{i}.{kv}": outs[f"present.{i}.{kv}"] for i in range(self.L) for kv in ("key", "value")}
        return torch.from_numpy(outs["logits"]), present

    def prefill(self, ids, mask, pos):
        b = ids.shape[0]
        empty = np.zeros((b, self.kvh, 0, self.d), self.past_dtype)
        return self._run(ids, mask, pos, {f"past_key_values.{i}.{kv}": empty for i in range(self.L) for kv in ("key", "value")})

    def step(self, ids, mask, pos, state):
        return self._run(ids, mask, pos, state)


# -- the plain transformers export ---------------------------------------------------------------

def export_hf_plain(ckpt_dir: Path, out_path: Path) -> None:
    """torch.onnx.export(dynamo=True) of transformers' Mixtral (batched_mm experts), KV cache as tensors."""
    from transformers import DynamicCache, MixtralForCausalLM
    model = MixtralForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="sdpa",
                                               experts_implementation="batched_mm").eval()
    cfg = model.config
    L, kvh = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=cfg)
            for i in range(L):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            flat = []
            for i in range(L):
                layer = out.past_key_values.layers[i]
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    B, S, P = 2, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    mask = torch.ones(B, P + S, dtype=torch.int64)
    pos = torch.arange(P, P + S)[None].expand(B, S).contiguous()
    past = [torch.randn(B, kvh, P, d) for _ in range(2 * L)]
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=4096)
    past_len, total = torch.export.Dim("past", max=8192), torch.export.Dim("total", max=8192)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
           "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len} for _ in range(2 * L)]}
    in_names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    with torch.no_grad():
        prog = torch.onnx.export(Wrapper(model), (ids, mask, pos, past), dynamo=True, dynamic_shapes=dyn,
                                 input_names=in_names, output_names=out_names, external_data=True,
                                 optimize=True, verbose=False)
    prog.save(str(out_path), external_data=True)


# -- timing --------------------------------------------------------------------------------------

def time_runner(runner, batch: int, prompt: int, steps: int, vocab: int) -> tuple[float, float]:
    """(prefill ms median, decode ms/step median)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt), generator=g)
    mask = torch.ones(batch, prompt, dtype=torch.int64)
    pos = torch.arange(prompt)[None].expand(batch, prompt).contiguous()
    prefill_times = []
    for _ in range(PREFILL_REPEATS + 1):
        t = time.perf_counter()
        logits, state = runner.prefill(ids, mask, pos)
        prefill_times.append(time.perf_counter() - t)
    prefill_ms = statistics.median(prefill_times[1:]) * 1e3
    step_times = []
    nxt = logits[:, -1:].argmax(-1)
    for s in range(WARMUP + steps):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
        pos = pos[:, -1:] + 1
        t = time.perf_counter()
        logits, state = runner.step(nxt, mask, pos, state)
        dt = time.perf_counter() - t
        nxt = logits[:, -1:].argmax(-1)
        if s >= WARMUP:
            step_times.append(dt)
    return prefill_ms, statistics.median(step_times) * 1e3


def greedy_tokens(runner, prompt: int, steps: int, vocab: int, forced: list[torch.Tensor] | None = None):
    """Batch 1: the argmax token after the prefill and after each of `steps` decode steps; a
    step's input is `forced[s]` when given (teacher forcing), else the runner's own argmax."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, prompt), generator=g)
    mask = torch.ones(1, prompt, dtype=torch.int64)
    pos = torch.arange(prompt)[None]
    logits, state = runner.prefill(ids, mask, pos)
    picked = [logits[:, -1:].argmax(-1)]
    for s in range(steps):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], dim=1)
        pos = pos[:, -1:] + 1
        logits, state = runner.step(forced[s] if forced else picked[-1], mask, pos, state)
        picked.append(logits[:, -1:].argmax(-1))
    return picked


def run_config(name: str, args, work: Path, bandwidth: float) -> None:
    from mixexport.checkpoint import write_checkpoint
    c = make_config(name)
    cdir = work / name
    ckpt = cdir / "ckpt"
    cdir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(ckpt, c, seed=0)
    from mixexport.quant import parse_scheme
    exe = Path(sys.executable).with_name("mixexport")
    # (label suffix, experts' scheme, build options, targets) of each artifact built
    variants = [("", None, [], ("portable", "ort"))]
    variants += [(f" {parse_scheme(q).name}", parse_scheme(q), ["--experts-quant", q], ("portable", "ort"))
                 for q in args.quant]
    variants += [(" fp16", None, ["--dtype", "float16"], ("portable", "ort")) for d in args.dtypes if d == "float16"]
    variants.append((" fused", None, ["--ort-provider", "cuda"], ("ort",)))
    outs = {suffix: cdir / f"out{suffix.replace(' ', '-')}" for suffix, *_ in variants}
    print(f"\n[{name}] H {c.hidden_size} I {c.intermediate_size} L {c.num_hidden_layers} E {c.num_local_experts} "
          f"k {c.num_experts_per_tok} V {c.vocab_size} {c.dtype}", flush=True)
    for suffix, quant, extra, targets in variants:
        folder = outs[suffix]
        t = time.perf_counter()
        subprocess.run([str(exe), "build", str(ckpt), "-o", str(folder), "--target", ",".join(targets), "--no-validate",
                        *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        entries = json.loads((folder / "manifest.json").read_text())["targets"]
        sizes = ", ".join(f"{target} {sum(f['bytes'] for f in e['files']) / 1e6:.1f} MB" for target, e in entries.items())
        print(f"[{name}] mixexport build{suffix or ' (fp32, full precision experts)'} {' '.join(extra)}: "
              f"{time.perf_counter() - t:.0f} s; {sizes}", flush=True)
    kv = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)

    runners: dict[str, object] = {}
    failures: dict[str, str] = {}

    def add(label, factory):
        try:
            runners[label] = factory()
        except Exception as exc:  # noqa: BLE001 - report and go on
            line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            failures[label] = line[:300]
            if args.verbose:
                traceback.print_exc()

    add("hf eager", lambda: HFRunner(ckpt))
    add("reference", lambda: RefRunner(ckpt))
    if not args.skip_hf_onnx:
        def hf_onnx():
            path = cdir / "hf_plain" / "model.onnx"
            path.parent.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            export_hf_plain(ckpt, path)
            print(f"[{name}] plain torch.onnx export of transformers' Mixtral: {time.perf_counter() - t0:.0f} s",
                  flush=True)
            return OrtRunner(path, *kv)
        add("hf onnx (ort)", hf_onnx)
    labels = ["reference", "hf eager", "hf onnx (ort)"]
    schemes = {}
    for suffix, quant, _, targets in variants:
        for target in targets:
            label = f"ours {target}{suffix}"
            labels.append(label)
            schemes[label] = quant
            add(label, lambda target=target, folder=outs[suffix]: OrtRunner(folder / target / "model.onnx", *kv))
    if "reference" in runners:
        forced = greedy_tokens(runners["reference"], args.prompt, args.steps, c.vocab_size)
        print(f"[{name}] top-1 agreement with the reference over {args.steps} teacher-forced decode steps, batch 1:")
        for label, runner in runners.items():
            if label.startswith("ours"):
                picked = greedy_tokens(runner, args.prompt, args.steps, c.vocab_size, forced[:-1])
                agree = [int(a == b) for a, b in zip(picked[1:], forced[1:])]
                first = f" (first {TARGET_STEPS}: {sum(agree[:TARGET_STEPS])}/{TARGET_STEPS})" if args.steps > TARGET_STEPS else ""
                print(f"    {label:<24} {sum(agree)}/{args.steps}{first}")

    for batch in args.batches:
        limit_ms = active_bytes(c, batch) / bandwidth * 1e3
        limits = {label: active_bytes(c, batch, quant) / bandwidth * 1e3 for label, quant in schemes.items()}
        results = {}
        for label, runner in runners.items():
            try:
                results[label] = time_runner(runner, batch, args.prompt, args.steps, c.vocab_size)
            except Exception as exc:  # noqa: BLE001
                results[label] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        base = results.get("hf eager")
        print(f"\n== {name}, batch {batch}, prompt {args.prompt}, {args.steps} decode steps; "
              f"bandwidth limit {limit_ms:.2f} ms/step ({active_bytes(c, batch) / 1e6:.0f} MB active weights) ==")
        print(f"{'implementation':<24} {'prefill ms':>10} {'decode ms/tok':>13} {'prefill x hf':>12} "
              f"{'decode x hf':>11} {'x limit':>8} {'x ours ort':>10}")
        ours = results.get("ours ort")
        for label in labels:
            r = results.get(label)
            if r is None:
                if label in failures:
                    print(f"{label:<24} FAILED: {failures[label]}")
                continue
            if isinstance(r, str):
                print(f"{label:<24} FAILED: {r}")
                continue
            pre, dec = r
            if isinstance(base, tuple):
                xp, xd = f"{pre / base[0]:.2f}", f"{dec / base[1]:.2f}"
            else:
                xp = xd = "n/a"
            speedup = f"{ours[1] / dec:.2f}" if isinstance(ours, tuple) else "n/a"  # > 1: faster than fp ort
            print(f"{label:<24} {pre:>10.1f} {dec:>13.2f} {xp:>12} {xd:>11} {dec / limits.get(label, limit_ms):>8.2f} "
                  f"{speedup:>10}")
        sys.stdout.flush()
    for label, line in failures.items():
        print(f"[{name}] {label} skipped: {line}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["small", "mid"], choices=["small", "mid"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-hf-onnx", action="store_true", help="skip the plain transformers export row")
    ap.add_argument("--quant", nargs="*", default=["int8", "int4"], choices=["int8", "int4"],
                    help="also build and time artifacts with these --experts-quant schemes (int4: group 32)")
    ap.add_argument("--dtypes", nargs="*", default=["float16"], choices=["float16"],
                    help="also build and time float16 artifacts (the float32 ones are always built)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    args = ap.parse_args()

    torch.set_num_threads(THREADS)
    print(machine_info())
    bw = dram_bandwidth()
    print(f"DRAM read bandwidth (torch sum over 2 GiB, 1 and {THREADS} threads, best of 5): {bw / 1e9:.2f} GB/s",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="mixexport-decode-", dir=args.workdir))
    try:
        for name in args.configs:
            run_config(name, args, work, bw)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
