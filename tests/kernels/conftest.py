"""Kernel tests run the Triton kernels on CPU tensors under the Triton interpreter.

triton chooses between compiling and interpreting when a kernel is decorated, and its interpreter
reads TRITON_INTERPRET again while it runs, so the variable is set here, before any test module
imports a kernel, and stays set for the session. Only code that imports triton reads it, which no
other test folder does. The GPU tests start a fresh process with the variable removed (see
_gpu_checks.py), so the compiled CUDA path is tested natively where a GPU exists.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def make_moe_inputs(num_tokens: int, hidden: int, inter: int, num_experts: int, dtype: torch.dtype,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random MoE inputs scaled so every intermediate is O(1).

    Returns:
        (x [N, H], router_logits [N, E] float32, w_gate_up [E, 2I, H], w_down [E, H, I]), x and weights in dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w_down = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    return x, logits, w_gate_up, w_down


@pytest.fixture
def moe_inputs():
    """The input factory, as a fixture."""
    return make_moe_inputs
