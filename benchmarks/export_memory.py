"""Peak memory and write throughput of `mixexport build` on Mixtral-8x7B-shaped checkpoints.

    python benchmarks/export_memory.py [--layers 1 2 4] [--repeats 3] [--workdir DIR] [--keep]

For each layer count N it writes a random checkpoint with the real Mixtral 8x7B shapes
(`mixexport init DIR --preset mixtral-8x7b --layers N`, about 3.4 GB per layer in bfloat16), then
runs `mixexport build DIR -o OUT --target ort --no-validate` in a child process and reports:

- wall time and peak RSS of the build (the child's ru_maxrss from `os.wait4`), and the capture and
  weight-writing phases as the build reports them;
- checkpoint bytes, and MB/s of weights written (size of OUT/ort/model.onnx.data / build wall time,
  start-up and capture included);
- the same machine's plain file-copy MB/s over the same checkpoint files (`shutil.copyfile`, then
  `os.sync`, timed), right before each build;
- ratio = write MB/s / copy MB/s of that pair. Copy and build alternate --repeats times (default
  3) and the table shows medians, because this VM's disk speed drifts by 2-3x within minutes.

Both sides end on disk: the build fsyncs what it writes, the copy is followed by `os.sync()`, and
dirty pages left by earlier steps are flushed (untimed) before each measurement. The checkpoint was
just written, so both read it largely from the page cache.

Targets (from the issue): peak RSS flat across layer counts and <= 4 GiB; throughput >= 50% of
file-copy speed. Everything it writes is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024**3
MB = 1e6


def mixexport_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("mixexport")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mixexport.cli.main"]


def scratch_dir(prefix: str, parent: Path | None) -> Path:
    """A new folder for one benchmark run's checkpoints and outputs (under `parent`, default the
    system temp folder), printed with the free disk there."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    print(f"workdir: {work}  (free disk {shutil.disk_usage(work).free / GiB:.0f} GiB)\n", flush=True)
    return work


def machine_info() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    versions = []
    for mod in ("torch", "onnxruntime", "onnx", "onnx_ir"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception as exc:  # noqa: BLE001 - informational only
            versions.append(f"{mod} ({type(exc).__name__})")
    return (f"machine: {platform.machine()} {os.cpu_count()} cores, {mem:.1f} GiB memory, "
            f"{platform.platform()}\npython {platform.python_version()}, " + ", ".join(versions))


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run cmd; return (wall seconds, peak RSS bytes of the child, combined output)."""
    out = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-3000:]}")
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return wall, peak, text


def checkpoint_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def copy_speed(files: list[Path], scratch: Path) -> float:
    """MB/s of a plain file-copy of the checkpoint's safetensors, flushed to disk like the build's
    output. The copies are deleted."""
    os.sync()  # earlier steps' dirty pages are not this copy's cost
    total, secs = 0, 0.0
    for f in files:
        dst = scratch / (f.name + ".copy")
        start = time.perf_counter()
        shutil.copyfile(f, dst)
        os.sync()
        secs += time.perf_counter() - start
        total += dst.stat().st_size
        dst.unlink()
    return total / MB / secs


def phase_seconds(output: str, pattern: str) -> float:
    found = re.search(pattern, output)
    return float(found.group(1)) if found else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workdir", type=Path, default=None, help="where checkpoints and outputs go")
    ap.add_argument("--repeats", type=int, default=3, help="copy + build pairs per layer count")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    args = ap.parse_args()

    print(machine_info())
    work = scratch_dir("mixexport-export-mem-", args.workdir)
    rows = []
    try:
        for n in args.layers:
            ckpt, out = work / f"ckpt-{n}", work / f"out-{n}"
            t0 = time.perf_counter()
            subprocess.run(mixexport_cmd() + ["init", str(ckpt), "--preset", "mixtral-8x7b", "--layers", str(n)],
                           check=True, stdout=subprocess.DEVNULL)
            files = checkpoint_files(ckpt)
            ckpt_bytes = sum(f.stat().st_size for f in files)
            print(f"[layers {n}] checkpoint {ckpt_bytes / 1e9:.2f} GB written in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            # The VM's disk speed drifts by 2-3x within minutes: copy and build alternate, and the
            # ratio is the median over the pairs, each copy measured right before its build.
            runs = []
            for repeat in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                copy_mbs = copy_speed(files, work)
                os.sync()
                wall, peak, output = run_measured(mixexport_cmd() + ["build", str(ckpt), "-o", str(out),
                                                                    "--target", "ort", "--no-validate"])
                data_bytes = (out / "ort" / "model.onnx.data").stat().st_size
                write_mbs = data_bytes / MB / wall
                capture = phase_seconds(output, r"captured in ([0-9.]+)s")
                writing = phase_seconds(output, r"ort: .* written in ([0-9.]+)s")
                runs.append((wall, capture, writing, peak, write_mbs, copy_mbs, write_mbs / copy_mbs))
                print(f"[layers {n}, run {repeat + 1}] copy {copy_mbs:.0f} MB/s; build {wall:.1f} s (capture "
                      f"{capture:.1f} s, lowering + writing {writing:.1f} s), peak RSS {peak / GiB:.2f} GiB, wrote "
                      f"{data_bytes / 1e9:.2f} GB ({write_mbs:.0f} MB/s); ratio {write_mbs / copy_mbs:.2f}", flush=True)
            median = [statistics.median(column) for column in zip(*runs)]
            median[3] = max(run[3] for run in runs)  # peak RSS: the worst run
            rows.append((n, ckpt_bytes, *median))
            if not args.keep:
                shutil.rmtree(ckpt)
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")

    print()
    header = (f"{'layers':>6} {'ckpt GB':>8} {'wall s':>7} {'capture s':>9} {'write s':>7} {'peak RSS GiB':>12} "
              f"{'write MB/s':>10} {'copy MB/s':>9} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for n, ckpt_bytes, wall, capture, writing, peak, write_mbs, copy_mbs, ratio in rows:
        print(f"{n:>6} {ckpt_bytes / 1e9:>8.2f} {wall:>7.1f} {capture:>9.1f} {writing:>7.1f} {peak / GiB:>12.2f} "
              f"{write_mbs:>10.0f} {copy_mbs:>9.0f} {ratio:>6.2f}")
    print(f"(medians over {args.repeats} copy + build pairs; ratio: median of the pairs' ratios; peak RSS: worst run)")
    if rows:
        peaks = [r[5] for r in rows]
        ratios = [r[8] for r in rows]
        print(f"\ntargets: peak RSS <= 4 GiB: {'PASS' if max(peaks) <= 4 * GiB else 'FAIL'} "
              f"(max {max(peaks) / GiB:.2f} GiB, spread {(max(peaks) - min(peaks)) / GiB:.2f} GiB across layer counts); "
              f"throughput >= 50% of copy: {'PASS' if min(ratios) >= 0.5 else 'FAIL'} (min ratio {min(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
