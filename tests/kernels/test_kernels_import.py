"""`mixexport.kernels` imports without triton and says how to install it when a kernel is asked for."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["triton"] = None  # what `import triton` sees when the package is not installed
import torch
import mixexport.kernels
from mixexport.errors import MixexportError
try:
    mixexport.kernels.fused_moe(torch.zeros(1, 4), torch.zeros(1, 2), torch.zeros(2, 8, 4), torch.zeros(2, 4, 4), 1)
except MixexportError as exc:
    print(exc)
"""


def test_missing_triton_is_a_user_error():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'mixexport[kernels]'" in result.stdout
