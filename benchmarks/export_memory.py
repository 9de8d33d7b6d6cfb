"""Peak memory and write throughput of `mixexport build` on Mixtral-8x7B-shaped checkpoints.

    python benchmarks/export_memory.py [--layers 1 2 4] [--workdir DIR] [--keep]

For each layer count N it writes a random checkpoint with the real Mixtral 8x7B shapes
(`mixexport init DIR --preset mixtral-8x7b --layers N`, about 3.4 GB per layer in bfloat16), then
runs `mixexport build DIR -o OUT --target ort --no-validate` in a child process and reports:

- wall time and peak RSS of the build (the child's ru_maxrss from `os.wait4`);
- checkpoint bytes, and MB/s of weights written (size of OUT/ort/model.onnx.data / build wall time);
- the same machine's plain file-copy MB/s over the same checkpoint files (`shutil.copyfile`, timed);
- ratio = write MB/s / copy MB/s.

Targets (from the issue): peak RSS flat across layer counts and <= 4 GiB; throughput >= 50% of
file-copy speed. Everything it writes is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
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


def copy_speed(files: list[Path], scratch: Path) -> tuple[float, float]:
    """Plain file-copy of the checkpoint's safetensors: (bytes, seconds). The copies are deleted."""
    total, secs = 0, 0.0
    for f in files:
        dst = scratch / (f.name + ".copy")
        start = time.perf_counter()
        shutil.copyfile(f, dst)
        os.sync()  # comparable with the build, whose files are also flushed by the end of the run
        secs += time.perf_counter() - start
        total += dst.stat().st_size
        dst.unlink()
    return total, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workdir", type=Path, default=None, help="where checkpoints and outputs go")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    args = ap.parse_args()

    print(machine_info())
    work = Path(tempfile.mkdtemp(prefix="mixexport-export-mem-", dir=args.workdir))
    print(f"workdir: {work}  (free disk {shutil.disk_usage(work).free / GiB:.0f} GiB)\n", flush=True)
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
            os.sync()
            wall, peak, _ = run_measured(mixexport_cmd() + ["build", str(ckpt), "-o", str(out),
                                                           "--target", "ort", "--no-validate"])
            data = out / "ort" / "model.onnx.data"
            data_bytes = data.stat().st_size
            write_mbs = data_bytes / MB / wall
            copied, copy_secs = copy_speed(files, work)
            copy_mbs = copied / MB / copy_secs
            rows.append((n, ckpt_bytes, wall, peak, write_mbs, copy_mbs))
            print(f"[layers {n}] build {wall:.1f} s, peak RSS {peak / GiB:.2f} GiB, wrote {data_bytes / 1e9:.2f} GB "
                  f"({write_mbs:.0f} MB/s); copy {copy_mbs:.0f} MB/s", flush=True)
            if not args.keep:
                shutil.rmtree(ckpt)
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")

    print()
    header = f"{'layers':>6} {'ckpt GB':>8} {'wall s':>8} {'peak RSS GiB':>12} {'write MB/s':>10} {'copy MB/s':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for n, ckpt_bytes, wall, peak, write_mbs, copy_mbs in rows:
        print(f"{n:>6} {ckpt_bytes / 1e9:>8.2f} {wall:>8.1f} {peak / GiB:>12.2f} {write_mbs:>10.0f} "
              f"{copy_mbs:>10.0f} {write_mbs / copy_mbs:>6.2f}")
    if rows:
        peaks = [r[3] for r in rows]
        ratios = [r[4] / r[5] for r in rows]
        print(f"\ntargets: peak RSS <= 4 GiB: {'PASS' if max(peaks) <= 4 * GiB else 'FAIL'} "
              f"(max {max(peaks) / GiB:.2f} GiB, spread {(max(peaks) - min(peaks)) / GiB:.2f} GiB across layer counts); "
              f"throughput >= 50% of copy: {'PASS' if min(ratios) >= 0.5 else 'FAIL'} (min ratio {min(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
