"""The prepared GPU check of the MoE kernels (run by benchmarks/gpu_check.sh; see its header).

    python benchmarks/gpu_check.py --out DIR --launcher LIB [--dry-run]

On an NVIDIA GPU: the Triton pipeline against `moe_reference` at Mixtral 8x7B and 8x22B layer
shapes and several token counts, timed against the measured device-to-device copy bandwidth and
the plain torch reference; rows without a softmax (NaN router logits) on the GPU; and the C++
launcher (LIB: libmixexport_moe_launch.so, the AOT cubins the TensorRT plugin embeds, no
TensorRT) on the same tensors, also replayed from a CUDA graph. Writes DIR/results.json and
DIR/summary.txt; exits 0 only when every check ran and passed.

--dry-run does everything up to the first GPU call (imports, the case list and its memory
estimate, loading LIB and asking it for workspace sizes) and exits 0 when that works.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# (name, hidden, intermediate, experts, top_k, token counts): one MoE layer of each model.
MODELS = [
    ("mixtral-8x7b", 4096, 14336, 8, 2, [1, 8, 64, 512, 2048]),
    ("mixtral-8x22b", 6144, 16384, 8, 2, [1, 16, 512]),
]
TOLERANCE = {"fp16": 2e-3, "bf16": 2e-2}  # max |out - ref| / max |ref|, as tests/kernels uses
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LAUNCHER_CASES = [("mixtral-8x7b", 1), ("mixtral-8x7b", 64), ("mixtral-8x7b", 512), ("mixtral-8x22b", 16)]
ERROR_BYTES = 512


def cases() -> list[dict]:
    """Every (model, dtype, N) the Triton part runs; bf16 only at one size per model (the kernels are the same)."""
    out = []
    for name, h, i, e, k, tokens in MODELS:
        for n in tokens:
            out.append({"model": name, "H": h, "I": i, "E": e, "K": k, "N": n, "dtype": "fp16"})
        out.append({"model": name, "H": h, "I": i, "E": e, "K": k, "N": tokens[1], "dtype": "bf16"})
    return out


def model(name: str) -> tuple[int, int, int, int]:
    """(H, I, E, K) of a model in MODELS."""
    for entry in MODELS:
        if entry[0] == name:
            return entry[1:5]
    raise KeyError(name)


def weight_bytes(h: int, i: int, e: int, element: int = 2) -> int:
    """Bytes of one layer's stacked expert weights: w_gate_up [E, 2I, H] and w_down [E, H, I]."""
    return 3 * e * h * i * element


class Launcher:
    """The C ABI of plugins/moe/tests/moe_launch_capi.cpp."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        i64, u64, size, text, ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p
        self.lib.mixexport_moe_workspace_bytes.argtypes = [i64, i64, i64, i64, i64, text, ctypes.POINTER(size), text,
                                                           size]
        self.lib.mixexport_moe_attach.argtypes = [text, size]
        self.lib.mixexport_moe_attach.restype = ptr
        self.lib.mixexport_moe_detach.argtypes = [ptr]
        self.lib.mixexport_moe_launch.argtypes = [ptr, i64, i64, i64, i64, i64, text, u64, u64, u64, u64, u64, u64, ptr,
                                                  text, size]
        self.handle = None

    def workspace_bytes(self, n: int, h: int, i: int, e: int, k: int, dtype: str) -> int:
        error, out = ctypes.create_string_buffer(ERROR_BYTES), ctypes.c_size_t()
        if self.lib.mixexport_moe_workspace_bytes(n, h, i, e, k, dtype.encode(), ctypes.byref(out), error, ERROR_BYTES):
            raise RuntimeError(error.value.decode())
        return out.value

    def attach(self) -> None:
        error = ctypes.create_string_buffer(ERROR_BYTES)
        self.handle = self.lib.mixexport_moe_attach(error, ERROR_BYTES)
        if not self.handle:
            raise RuntimeError(error.value.decode())

    def launch(self, x, logits, w_gate_up, w_down, y, workspace, top_k: int, dtype: str) -> None:
        error = ctypes.create_string_buffer(ERROR_BYTES)
        n, h = x.shape
        e, two_i, _ = w_gate_up.shape
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        if self.lib.mixexport_moe_launch(self.handle, n, h, two_i // 2, e, top_k, dtype.encode(), x.data_ptr(),
                                         logits.data_ptr(), w_gate_up.data_ptr(), w_down.data_ptr(), y.data_ptr(),
                                         workspace.data_ptr(), stream, error, ERROR_BYTES):
            raise RuntimeError(error.value.decode())

    def close(self) -> None:
        if self.handle:
            self.lib.mixexport_moe_detach(self.handle)
            self.handle = None


def copy_bandwidth_gbps(gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / seconds / 1e9


def make_weights(h, i, e, dtype, seed=0):
    """w_gate_up [E, 2I, H], w_down [E, H, I], scaled so every intermediate is O(1)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w_gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) / h**0.5).to(dtype)
    w_down = (torch.randn(e, h, i, device="cuda", generator=gen) / i**0.5).to(dtype)
    return w_gate_up, w_down


def make_tokens(n, h, e, dtype, seed=0):
    """x [N, H], router_logits [N, E]."""
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(n, h, device="cuda", generator=gen).to(dtype)
    return x, torch.randn(n, e, device="cuda", generator=gen).to(dtype)


def make_inputs(n, h, i, e, dtype, seed=0):
    return (*make_tokens(n, h, e, dtype, seed), *make_weights(h, i, e, dtype, seed))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def routed_experts(logits: torch.Tensor, top_k: int) -> int:
    from mixexport.model.moe import route

    return route(logits, top_k)[1].unique().numel()


def run_triton(results: dict, copy_gbps: float) -> None:
    import triton.testing

    from mixexport.kernels import fused_moe
    from mixexport.model.moe import moe_reference

    weights = {}
    for case in cases():
        n, h, i, e, k, dtype = case["N"], case["H"], case["I"], case["E"], case["K"], DTYPES[case["dtype"]]
        key = (h, i, e, case["dtype"])
        if key not in weights:
            weights.clear()  # one model's weights at a time
            torch.cuda.empty_cache()
            weights[key] = make_weights(h, i, e, dtype)
        w_gate_up, w_down = weights[key]
        x, logits = make_tokens(n, h, e, dtype, seed=n)
        out = fused_moe(x, logits, w_gate_up, w_down, k)
        ref = moe_reference(x, logits, w_gate_up, w_down, k)  # fp32 accumulation on the GPU
        err = rel_error(out, ref)
        experts = routed_experts(logits, k)
        moved = experts * weight_bytes(h, i, 1, x.element_size()) + 2 * x.numel() * x.element_size()
        # do_bench clears L2 between runs: every run streams the weights from DRAM.
        fused_ms = triton.testing.do_bench(lambda: fused_moe(x, logits, w_gate_up, w_down, k))
        torch_ms = triton.testing.do_bench(lambda: moe_reference(x, logits, w_gate_up, w_down, k))
        fused_gbps = moved / fused_ms / 1e6
        results["triton"].append({**case, "rel_error": err, "pass": err <= TOLERANCE[case["dtype"]],
                                  "routed_experts": experts, "min_bytes": moved, "triton_ms": fused_ms,
                                  "torch_ms": torch_ms, "triton_gbps": fused_gbps,
                                  "fraction_of_copy_bandwidth": fused_gbps / copy_gbps,
                                  "speedup_over_torch": torch_ms / fused_ms})
        print(f"  {case['model']:14} {case['dtype']} N={n:<5} err {err:.1e}  triton {fused_ms:8.3f} ms "
              f"({fused_gbps:6.0f} GB/s, {100 * fused_gbps / copy_gbps:5.1f}% of copy)  torch {torch_ms:8.3f} ms",
              flush=True)
    weights.clear()
    torch.cuda.empty_cache()


def run_non_finite(results: dict) -> None:
    from mixexport.kernels import fused_moe
    from mixexport.model.moe import moe_reference

    x, logits, w_gate_up, w_down = make_inputs(32, 256, 512, 8, torch.float16)
    logits[3, 1] = float("nan")
    logits[9, 0] = float("inf")
    logits[20] = float("-inf")
    out = fused_moe(x, logits, w_gate_up, w_down, 2)
    ref = moe_reference(x, logits, w_gate_up, w_down, 2)
    bad = [3, 9, 20]
    good = [r for r in range(32) if r not in bad]
    ok = bool(out[bad].isnan().all() and ref[bad].isnan().all() and out[good].isfinite().all())
    err = rel_error(out[good], ref[good])
    results["non_finite"] = {"pass": ok and err <= TOLERANCE["fp16"], "rel_error_finite_rows": err}


def run_launcher(results: dict, launcher: Launcher, copy_gbps: float) -> None:
    from mixexport.kernels import fused_moe
    from mixexport.model.moe import moe_reference

    launcher.attach()  # loads the modules now: never inside the captured stream below
    for name, n in LAUNCHER_CASES:
        h, i, e, k = model(name)
        x, logits, w_gate_up, w_down = make_inputs(n, h, i, e, torch.float16, seed=n)
        y = torch.empty_like(x)
        workspace = torch.empty(launcher.workspace_bytes(n, h, i, e, k, "fp16"), dtype=torch.uint8, device="cuda")
        launcher.launch(x, logits, w_gate_up, w_down, y, workspace, k, "fp16")
        torch.cuda.synchronize()
        ref = moe_reference(x, logits, w_gate_up, w_down, k)
        err = rel_error(y, ref)
        same_as_triton = bool(torch.equal(y, fused_moe(x, logits, w_gate_up, w_down, k)))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 20
        start.record()
        for _ in range(reps):
            launcher.launch(x, logits, w_gate_up, w_down, y, workspace, k, "fp16")
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / reps  # back to back: weights may partly hit L2 at small N
        # CUDA graph: the same launches captured and replayed on new inputs.
        graph = torch.cuda.CUDAGraph()
        captured = torch.empty_like(x)
        with torch.cuda.graph(graph):
            launcher.launch(x, logits, w_gate_up, w_down, captured, workspace, k, "fp16")
        x.copy_(torch.randn_like(x))
        graph.replay()
        launcher.launch(x, logits, w_gate_up, w_down, y, workspace, k, "fp16")
        torch.cuda.synchronize()
        replay_ok = bool(torch.equal(captured, y))
        gbps = (routed_experts(logits, k) * weight_bytes(h, i, 1) + 2 * x.numel() * 2) / ms / 1e6
        results["launcher"].append({"model": name, "N": n, "rel_error": err, "equal_to_triton": same_as_triton,
                                    "cuda_graph_replay_equal": replay_ok, "ms": ms, "gbps": gbps,
                                    "fraction_of_copy_bandwidth": gbps / copy_gbps,
                                    "pass": err <= TOLERANCE["fp16"] and replay_ok})
        print(f"  launcher {name:14} N={n:<5} err {err:.1e} equal-to-triton {same_as_triton} graph-replay "
              f"{replay_ok} {ms:8.3f} ms", flush=True)
        del x, logits, w_gate_up, w_down, y, workspace, captured
        torch.cuda.empty_cache()
    launcher.close()


def dry_run(results: dict, launcher: Launcher | None) -> None:
    """Everything up to the first GPU call."""
    import triton  # noqa: F401  (the kernels import it on first use)

    from mixexport.kernels import configs
    from mixexport.model.moe import moe_reference  # noqa: F401

    for case in cases():
        if case["H"] % 16 or case["I"] % 16 or case["E"] > configs.AOT_MAX_EXPERTS:
            raise SystemExit(f"gpu_check: case {case} is outside what the compiled kernels accept")
        configs.gemm_tile(90, case["N"] * case["K"], case["E"])
    largest = max(weight_bytes(h, i, e) for _, h, i, e, _, _ in MODELS)
    results["dry_run"] = {"cases": len(cases()), "launcher_cases": len(LAUNCHER_CASES),
                          "largest_weights_gib": largest / 2**30}
    if launcher is not None:
        sizes = {f"{name} N={n}": launcher.workspace_bytes(n, *model(name), "fp16") for name, n in LAUNCHER_CASES}
        results["dry_run"]["launcher_workspace_bytes"] = sizes
        try:
            launcher.attach()
            results["dry_run"]["launcher_attach"] = "attached (a GPU driver is present)"
            launcher.close()
        except RuntimeError as exc:  # no driver here: the launcher must say so in one line
            results["dry_run"]["launcher_attach"] = str(exc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--launcher", default=None, help="libmixexport_moe_launch.so (omit: launcher part not done)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_check: unset TRITON_INTERPRET (this times compiled kernels)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
                     "torch": torch.__version__, "dry_run_only": args.dry_run, "triton": [], "launcher": [],
                     "not_done": []}
    launcher = Launcher(args.launcher) if args.launcher else None
    if launcher is None:
        results["not_done"].append("launcher: no libmixexport_moe_launch.so was built (see gpu_check.sh's output)")
    if args.dry_run:
        dry_run(results, launcher)
        return write(args.out, results, passed=not results["not_done"])
    if not torch.cuda.is_available():
        print("gpu_check: no NVIDIA GPU is visible (torch.cuda.is_available() is False); use --dry-run",
              file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    results["gpu"] = {"name": props.name, "cc": f"{props.major}.{props.minor}",
                      "memory_gib": props.total_memory / 2**30, "torch_cuda": torch.version.cuda}
    print(f"gpu_check on {props.name} (sm_{props.major}{props.minor})", flush=True)
    copy_gbps = copy_bandwidth_gbps()
    results["copy_gbps"] = copy_gbps
    print(f"  device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    parts = [("triton", lambda: run_triton(results, copy_gbps)), ("non_finite", lambda: run_non_finite(results))]
    if launcher is not None:
        parts.append(("launcher", lambda: run_launcher(results, launcher, copy_gbps)))
    for part, run in parts:
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - the report says which part failed and why
            results["not_done"].append(f"{part}: {type(exc).__name__}: {exc}")
            print(f"  {part} failed: {exc}", flush=True)
        write(args.out, results, passed=False)  # what is done so far, in case the time budget runs out
    passed = (all(r["pass"] for r in results["triton"] + results["launcher"])
              and results.get("non_finite", {}).get("pass", False) and not results["not_done"])
    return write(args.out, results, passed)


def write(out: Path, results: dict, passed: bool) -> int:
    """Write results.json and summary.txt; the exit status (0 only when everything ran and passed)."""
    results["pass"] = passed
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"pass: {passed}"] + [f"not done: {line}" for line in results["not_done"]]
    if "copy_gbps" in results:
        lines.append(f"copy bandwidth {results['copy_gbps']:.0f} GB/s")
    for r in results["triton"]:
        lines.append(f"triton {r['model']} {r['dtype']} N={r['N']}: err {r['rel_error']:.1e}, {r['triton_ms']:.3f} ms, "
                     f"{100 * r['fraction_of_copy_bandwidth']:.1f}% of copy bandwidth, torch {r['torch_ms']:.3f} ms")
    if "non_finite" in results:
        lines.append(f"non-finite router logits: {results['non_finite']}")
    for r in results["launcher"]:
        lines.append(f"launcher {r['model']} N={r['N']}: err {r['rel_error']:.1e}, graph replay "
                     f"{r['cuda_graph_replay_equal']}, {r['ms']:.3f} ms")
    if "dry_run" in results:
        lines.append(f"dry run: {json.dumps(results['dry_run'])}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
