"""benchmarks/gpu_check.py starts here (no GPU): its dry run gets as far as the first GPU call."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _run(*args):
    # A fresh process: this one interprets the kernels (TRITON_INTERPRET=1, see conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_without_the_launcher_is_not_a_pass(tmp_path):
    result = _run("--dry-run", "--out", str(tmp_path))
    assert result.returncode == 1, result.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["pass"] is False and report["dry_run"]["cases"] == 10
    assert any(line.startswith("launcher:") for line in report["not_done"])
    assert "not done: launcher" in (tmp_path / "summary.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: benchmarks/gpu_check.sh runs the real check")
def test_without_a_gpu_it_says_so(tmp_path):
    result = _run("--out", str(tmp_path))
    assert result.returncode == 2 and "no NVIDIA GPU is visible" in result.stderr
