"""The MoE op: the one reference every MoE implementation in mixexport is tested against.

Semantics (ARCHITECTURE.md, `mixexport::MoE`):
    p = softmax(router_logits) over E
    take the top_k experts by p, exact ties broken toward the lower expert index
    if normalize: w = p[topk] / sum(p[topk])   else: w = p[topk]
    out[n] = sum_j w_j * Down[e_j] @ (silu(Gate[e_j] @ x[n]) * Up[e_j] @ x[n])
accumulated in float32, returned in x's dtype.

Non-finite router logits: a row with a NaN or a +inf logit, or with every logit -inf, has no
softmax (IEEE arithmetic makes the whole row NaN). Such a token is routed to experts 0..K-1 with
NaN weights, so every column of its output is NaN; no other token is affected. -inf logits in a
row that also has a finite one are probability 0, as softmax gives. Every implementation follows
this (`route` below is its definition), so no kernel reads an expert id outside [0, E).

Weight layout (the same for the reference model, the Triton kernels and the TensorRT plugin):
    w_gate_up [E, 2I, H]: rows 0..I-1 are the gate projection (Mixtral w1), rows I..2I-1 the up
                          projection (w3), Hugging Face's `gate_up_proj` layout;
    w_down    [E, H, I]:  the down projection (w2).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts.

    Args:
        router_logits: [N, E] any float dtype.
        top_k: experts per token (1 <= top_k <= E).
        normalize: renormalize the kept probabilities to sum to 1 (Mixtral does).

    Returns:
        (weights [N, K] float32, experts [N, K] int64), experts in descending weight order, ties to
        the lower index. A token without a softmax (see the module docstring) gets experts 0..K-1
        and NaN weights.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    # IEEE softmax is NaN in a whole row or nowhere in it; such a row ranks as all ties (experts
    # 0..K-1) instead of by however a sort orders NaN. Finite rows are left exactly as they are.
    no_softmax = torch.isnan(probs).any(dim=-1, keepdim=True)
    # A stable descending sort keeps equal probabilities in index order: ties go to the lower index,
    # which torch.topk does not promise.
    weights, experts = torch.sort(torch.where(no_softmax, 0.0, probs), dim=-1, descending=True, stable=True)
    weights, experts = weights[:, :top_k], experts[:, :top_k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.where(no_softmax, float("nan"), weights), experts


def moe_reference(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    normalize: bool = True,
) -> torch.Tensor:
    """The MoE op, computed expert by expert on the tokens routed to it.

    Args:
        x: [N, H] hidden states.
        router_logits: [N, E].
        w_gate_up: [E, 2I, H], gate rows first, then up rows.
        w_down: [E, H, I].
        top_k: experts per token.
        normalize: renormalize the top-k probabilities.

    Returns:
        [N, H] in x's dtype; the sum over experts is accumulated in float32.
    """
    (out,) = moe_reference_batches([(x, router_logits)], lambda e: (w_gate_up[e], w_down[e]), w_gate_up.shape[0],
                                   top_k, normalize)
    return out


def moe_reference_batches(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    num_experts: int,
    top_k: int,
    normalize: bool = True,
) -> list[torch.Tensor]:
    """`moe_reference` on several independent batches of tokens that share the experts.

    Each expert's weights are fetched and upcast once for all the batches (validation runs every
    scenario step through a layer at once: one upcast of a Mixtral 8x7B expert is 700 MB of
    float32), and each batch is computed exactly as `moe_reference` computes it alone: the same
    routing, the same matmul shapes, the same accumulation order.

    Args:
        batches: (x [N_b, H], router_logits [N_b, E]) per batch, every x in one dtype.
        expert_weights: expert index -> (gate_up [2I, H], down [H, I]) in any float dtype; called
            only for experts some token is routed to.
        num_experts: E.
        top_k: experts per token.
        normalize: renormalize the top-k probabilities.

    Returns:
        per batch, [N_b, H] in its x's dtype.
    """
    acc_dtype = torch.float64 if batches and batches[0][0].dtype == torch.float64 else torch.float32
    routed = [route(router_logits, top_k, normalize) for _, router_logits in batches]
    outs = [torch.zeros(x.shape, dtype=acc_dtype, device=x.device) for x, _ in batches]
    for e in range(num_experts):
        chosen = [torch.nonzero(experts == e, as_tuple=True) for _, experts in routed]
        if all(token_idx.numel() == 0 for token_idx, _ in chosen):
            continue
        w_gate_up, w_down = (w.to(acc_dtype) for w in expert_weights(e))  # [2I, H], [H, I]
        inter = w_gate_up.shape[0] // 2
        for (x, _), (weights, _), (token_idx, slot), out in zip(batches, routed, chosen, outs):
            if token_idx.numel() == 0:
                continue
            xe = x[token_idx].to(acc_dtype)  # [n_e, H]
            gate_up = xe @ w_gate_up.T  # [n_e, 2I]
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n_e, I]
            y = act @ w_down.T  # [n_e, H]
            out.index_add_(0, token_idx, y * weights[token_idx, slot].to(acc_dtype)[:, None])
    return [out.to(x.dtype) for out, (x, _) in zip(outs, batches)]
