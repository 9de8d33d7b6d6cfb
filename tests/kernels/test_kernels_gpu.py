"""The compiled CUDA path: numerics, CUDA graph capture (no host sync), the custom op."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
def test_cuda_pipeline():
    # A fresh process: this one interprets the kernels (TRITON_INTERPRET=1, see conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("_gpu_checks.py"))], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
