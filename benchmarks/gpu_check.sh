#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA GPU (sm_80+) and no internet, in under 8
# minutes, it
#   1. builds the TensorRT-free launcher (AOT-compiles the Triton kernels for this GPU's arch,
#      embeds the cubins, libmixexport_moe_launch.so) with CMake, when cmake and the CUDA toolkit
#      are there;
#   2. runs benchmarks/gpu_check.py: the Triton kernels against moe_reference at Mixtral 8x7B and
#      8x22B shapes and several token counts, timed against the measured device-to-device copy
#      bandwidth and the plain torch reference; NaN router logits on the GPU; the C++ launcher with
#      the AOT cubins on real tensors, also replayed from a CUDA graph.
# Results go to OUT/results.json and OUT/summary.txt. Exit status 0 only when everything ran and
# passed; 2 when there is no GPU (the message says so; --dry-run then checks everything up to the
# first GPU call).
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT]        OUT: the argument, else $OUT, else ./gpu_check_results
#   PYTHON=/path/to/venv/bin/python benchmarks/gpu_check.sh ...   (an interpreter with mixexport, torch+CUDA, triton)
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=""
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run="--dry-run"
    shift
fi
out="${1:-${OUT:-$PWD/gpu_check_results}}"
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
start=$SECONDS

if ! "$python" -c "import torch, triton, mixexport" 2>"$out/import_error.txt"; then
    echo "gpu_check: $python cannot import torch, triton and mixexport ($(tail -1 "$out/import_error.txt")); " \
         "set PYTHON to the venv that has them (pip install -e '.[test]')" >&2
    exit 2
fi
rm -f "$out/import_error.txt"

if [[ -z "$dry_run" ]]; then
    if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no NVIDIA GPU is visible to torch (torch.cuda.is_available() is False); nothing was " \
             "measured. Run with --dry-run to check everything up to the GPU calls." >&2
        exit 2
    fi
    arch="$("$python" -c "import torch; major, minor = torch.cuda.get_device_capability(0); print(major * 10 + minor)")"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi > "$out/nvidia-smi.txt" 2>&1
else
    arch=90  # what the check would build for an H100/H200
fi

# 1. The launcher library: the plugin's plan and launcher with this arch's AOT cubins, no TensorRT.
launcher_args=()
if command -v cmake >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1; then
    build="$out/build"
    if cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$python")" \
             -DMIXEXPORT_CUDA_ARCHS="$arch" -DMIXEXPORT_KERNEL_DTYPES="fp16;bf16" > "$out/cmake.log" 2>&1 &&
       cmake --build "$build" --parallel "$(nproc)" --target mixexport_moe_launch >> "$out/cmake.log" 2>&1; then
        launcher_args=(--launcher "$build/plugins/moe/tests/libmixexport_moe_launch.so")
        echo "gpu_check: built the launcher for sm_$arch in $((SECONDS - start)) s"
    else
        echo "gpu_check: the launcher build failed (see $out/cmake.log); its part is not done" >&2
    fi
else
    echo "gpu_check: no cmake or nvcc (CUDA toolkit) on PATH: the launcher part is not done" >&2
fi

# 2. The checks, bounded so the whole run stays under 8 minutes.
left=$((470 - (SECONDS - start)))
timeout "$left" env -u TRITON_INTERPRET "$python" "$repo/benchmarks/gpu_check.py" --out "$out" $dry_run \
    "${launcher_args[@]}"
status=$?
if [[ $status -eq 124 ]]; then
    echo "gpu_check: stopped after $left s (the 8-minute budget); $out/results.json has the parts done by then" >&2
fi
echo "gpu_check: exit $status after $((SECONDS - start)) s; results in $out"
exit $status
