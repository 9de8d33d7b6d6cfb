"""Peak memory and wall time of layer-streamed validation on Mixtral-8x7B-shaped checkpoints.

    python benchmarks/validate_memory.py [--layers 2 4] [--whole-layers 2] [--workdir DIR] [--keep]

For each layer count N it writes a random float16 checkpoint with the real Mixtral 8x7B shapes
(`mixexport init DIR --preset mixtral-8x7b --layers N --dtype float16`, about 2.9 GB per layer;
hidden 4096, intermediate 14336, 8 experts, 32 heads / 8 KV heads, vocab 32000), then, each in a
child process measured with `os.wait4` (peak RSS = the child's ru_maxrss):

1. export: `mixexport build DIR -o OUT --target ort --dtype float16 --no-validate`;
2. streamed: `mixexport validate OUT --validation-mode streamed`;
3. whole (only for the layer counts in --whole-layers): `mixexport validate OUT --validation-mode
   whole`, for comparison. It holds the reference and the whole graph's session: about 3x the
   weights (18 GB for 2 layers), so run it only where that much memory is free.

Targets (from issue 13): streamed peak RSS flat across layer counts and <= 6 GiB; streamed time
<= 1.5x the export time of the same checkpoint. Everything it writes is removed at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

# The sibling benchmark's measuring helpers (this directory is on sys.path when run as a script).
from export_memory import machine_info, mixexport_cmd, run_measured, scratch_dir

GiB = 1024**3


def _load() -> str:
    """The 1/5/15-minute load average: times on a shared machine mean little without it."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--whole-layers", type=int, nargs="*", default=[2],
                    help="layer counts also validated whole-model (needs ~9 GB of RAM per layer)")
    ap.add_argument("--workdir", type=Path, default=None, help="where checkpoints and outputs go")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    args = ap.parse_args()

    print(machine_info())
    work = scratch_dir("mixexport-validate-mem-", args.workdir)
    rows = []
    try:
        for n in args.layers:
            ckpt, out = work / f"ckpt-{n}", work / f"out-{n}"
            start = time.perf_counter()
            run_measured(mixexport_cmd() + ["init", str(ckpt), "--preset", "mixtral-8x7b", "--layers", str(n),
                                            "--dtype", "float16"])
            ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            print(f"[layers {n}] checkpoint {ckpt_bytes / 1e9:.2f} GB written in {time.perf_counter() - start:.0f} s",
                  flush=True)
            phases = {"export": ["build", str(ckpt), "-o", str(out), "--target", "ort", "--dtype", "float16",
                                 "--no-validate"],
                      "streamed": ["validate", str(out), "--validation-mode", "streamed"]}
            if n in args.whole_layers:
                phases["whole"] = ["validate", str(out), "--validation-mode", "whole"]
            measured = {}
            for phase, cmd in phases.items():
                try:
                    wall, peak, output = run_measured(mixexport_cmd() + cmd)
                except RuntimeError as exc:  # e.g. whole validation killed for memory: report, go on
                    print(f"[layers {n}] {phase} FAILED: {str(exc)[-600:]}", flush=True)
                    measured[phase] = (float("nan"), float("nan"))
                    continue
                measured[phase] = (wall, peak)
                passed = re.search(r"validation: (passed|FAILED)|parity", output)
                print(f"[layers {n}] {phase}: {wall:.1f} s, peak RSS {peak / GiB:.2f} GiB"
                      + (f" ({passed.group(0)})" if passed and phase != "export" else "")
                      + f"; load average {_load()}", flush=True)
                if phase == "streamed":  # where its time went: the per-phase timers of its progress lines
                    print("\n".join(line for line in output.splitlines() if "streamed validation:" in line
                                    or "validation mode" in line or "checksums:" in line), flush=True)
            rows.append((n, ckpt_bytes, measured))
            if not args.keep:
                shutil.rmtree(ckpt)
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")

    print()
    header = f"{'layers':>6} {'ckpt GB':>8} {'phase':>9} {'wall s':>8} {'peak RSS GiB':>12}"
    print(header)
    print("-" * len(header))
    for n, ckpt_bytes, measured in rows:
        for phase, (wall, peak) in measured.items():
            print(f"{n:>6} {ckpt_bytes / 1e9:>8.2f} {phase:>9} {wall:>8.1f} {peak / GiB:>12.2f}")
    streamed = [(m["streamed"], m["export"]) for _, _, m in rows if "streamed" in m]
    if streamed:
        peaks = [s[1] for s, _ in streamed]
        ratios = [s[0] / e[0] for s, e in streamed]
        print(f"\ntargets: streamed peak RSS <= 6 GiB: {'PASS' if max(peaks) <= 6 * GiB else 'FAIL'} "
              f"(max {max(peaks) / GiB:.2f} GiB, spread {(max(peaks) - min(peaks)) / GiB:.2f} GiB across layer "
              f"counts); streamed time <= 1.5x export: {'PASS' if max(ratios) <= 1.5 else 'FAIL'} "
              f"(max ratio {max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
