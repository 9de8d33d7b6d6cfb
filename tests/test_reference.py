"""The reference decoder against Hugging Face's MixtralForCausalLM, and the MoE op against a naive loop.

Both models load the same checkpoint written by `write_checkpoint`. A batch of two prompts, the
second left-padded, is run through a prefill and then greedy decode steps through each model's
KV cache, with position_ids = cumsum(mask) - 1 clamped at 0, as Hugging Face's generate makes them.
Both models are fed the reference's greedy tokens (so every step compares the same inputs), and
Hugging Face's own greedy choice is checked to be the same token.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, MixtralForCausalLM

from mixexport.checkpoint import Checkpoint, MixtralConfig
from mixexport.model import MixtralDecoder, load_reference, moe_reference, route
from mixexport.model.moe import moe_reference_batches

PROMPT_LEN = 8  # row 0: 8 real tokens; row 1: PAD real tokens left-padded to 8
PAD = 3
DECODE_STEPS = 4  # total length 12: longer than every sliding window below, so windows matter


def tiny(**shape) -> MixtralConfig:
    base = dict(intermediate_size=40, num_hidden_layers=2, vocab_size=97, rope_theta=1e4, dtype="float32",
                max_position_embeddings=256)
    return MixtralConfig(**{**base, **shape})


# Each id spells out what the config covers: E experts, top-k, query heads per KV head, whether
# head_dim differs from hidden/heads, sliding window, tied embeddings.
CONFIGS = {
    "E2-k1-gqa1": tiny(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                       num_local_experts=2, num_experts_per_tok=1),
    "E4-k2-gqa2-hd16-window4-tied": tiny(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                         tie_word_embeddings=True),
    "E8-k3-gqa4-hd6-window3": tiny(hidden_size=40, num_attention_heads=8, num_key_value_heads=2, head_dim=6,
                                   num_local_experts=8, num_experts_per_tok=3, sliding_window=3, rope_theta=1e6),
    "E8-k2-gqa4-tied": tiny(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                            num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=True),
    "E4-k3-gqa2-hd12-window6": tiny(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                                    num_local_experts=4, num_experts_per_tok=3, sliding_window=6,
                                    num_hidden_layers=3),
}


@dataclasses.dataclass
class Rollout:
    """Per step: both models' logits [B, S, V], which query positions are real [B, S], the mask [B, T]."""

    config: MixtralConfig
    ref_logits: list[torch.Tensor]
    hf_logits: list[torch.Tensor]
    real: list[torch.Tensor]
    attention_mask: torch.Tensor
    ref_present: list[tuple[torch.Tensor, torch.Tensor]]
    hf_cache: DynamicCache


def prompt(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [2, PROMPT_LEN] and attention_mask: row 1 left-padded with PAD zeros."""
    ids = torch.randint(3, vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, PROMPT_LEN, dtype=torch.int64)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0  # the pad token id; its value must not matter
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def load_hf(path, dtype: torch.dtype) -> MixtralForCausalLM:
    model, info = MixtralForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@torch.no_grad()
def rollout(path, dtype: torch.dtype) -> Rollout:
    ckpt = Checkpoint(path)
    ref = load_reference(ckpt, dtype)
    hf = load_hf(path, dtype)
    ids, mask = prompt(ckpt.config.vocab_size)
    pos = positions(mask)
    cache = DynamicCache(config=hf.config)
    ref_logits, present = ref(ids, mask, pos, ref.empty_cache(2))
    hf_logits = hf(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True).logits.float()
    result = Rollout(ckpt.config, [ref_logits], [hf_logits], [mask.bool()], mask, present, cache)
    for _ in range(DECODE_STEPS):
        next_ids = ref_logits[:, -1:].argmax(-1)  # [B, 1]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
        pos = pos[:, -1:] + 1
        ref_logits, present = ref(next_ids, mask, pos, present)
        hf_logits = hf(input_ids=next_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits.float()
        result.ref_logits.append(ref_logits)
        result.hf_logits.append(hf_logits)
        result.real.append(torch.ones(2, 1, dtype=torch.bool))
    result.attention_mask, result.ref_present = mask, present
    return result


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def fp32_rollout(request, checkpoint_factory) -> Rollout:
    return rollout(checkpoint_factory(CONFIGS[request.param], seed=11), torch.float32)


# -- reference vs Hugging Face, float32 ------------------------------------------------------------

def test_logits_match_hf_on_real_positions(fp32_rollout):
    for step, (ref, hf, real) in enumerate(zip(fp32_rollout.ref_logits, fp32_rollout.hf_logits, fp32_rollout.real)):
        assert ref.dtype == torch.float32 and ref.shape == hf.shape
        # Random weights give small logits; make sure they are not degenerate, or 1e-4 would prove nothing.
        assert ref[real].std() > 0.05, step
        diff = (ref - hf).abs()[real].max().item()
        assert diff < 1e-4, f"step {step}: max |ref - hf| = {diff:.3g}"


def test_greedy_tokens_match_hf(fp32_rollout):
    ref_tokens = torch.stack([logits[:, -1].argmax(-1) for logits in fp32_rollout.ref_logits], dim=1)
    hf_tokens = torch.stack([logits[:, -1].argmax(-1) for logits in fp32_rollout.hf_logits], dim=1)
    assert torch.equal(ref_tokens, hf_tokens)


def test_kv_cache_matches_hf(fp32_rollout):
    # Keys are stored after RoPE, as Hugging Face stores them. Hugging Face keeps only the last
    # window - 1 positions in a sliding-window cache: compare those.
    mask = fp32_rollout.attention_mask
    for layer, (key, value) in enumerate(fp32_rollout.ref_present):
        c = fp32_rollout.config
        assert key.shape == value.shape == (2, c.num_key_value_heads, mask.shape[1], c.head_dim)
        hf_key, hf_value = fp32_rollout.hf_cache.layers[layer].keys, fp32_rollout.hf_cache.layers[layer].values
        kept = hf_key.shape[2]
        assert kept == (mask.shape[1] if c.sliding_window is None else c.sliding_window - 1)
        real = mask[:, -kept:].bool()  # [B, kept]
        torch.testing.assert_close(key[:, :, -kept:].transpose(1, 2)[real], hf_key.transpose(1, 2)[real],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value[:, :, -kept:].transpose(1, 2)[real], hf_value.transpose(1, 2)[real],
                                   atol=1e-5, rtol=1e-5)


# -- properties of the reference alone ------------------------------------------------------------

@torch.no_grad()
def test_left_padding_does_not_change_real_tokens(checkpoint_factory):
    """Row 1 of the padded batch computes what the same prompt computes alone, unpadded."""
    ref = load_reference(Checkpoint(checkpoint_factory(CONFIGS["E4-k2-gqa2-hd16-window4-tied"], seed=11)))
    ids, mask = prompt(ref.config.vocab_size)
    batch_logits, _ = ref(ids, mask, positions(mask), ref.empty_cache(2))
    alone_ids, alone_mask = ids[1:, PAD:], mask[1:, PAD:]
    alone_logits, _ = ref(alone_ids, alone_mask, positions(alone_mask), ref.empty_cache(1))
    torch.testing.assert_close(batch_logits[1, PAD:], alone_logits[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", [name for name, c in CONFIGS.items() if c.sliding_window])
def test_sliding_window_matters_for_these_sequences(name, checkpoint_factory):
    """Without the window the same weights give other logits: the window cases test the window."""
    windowed = load_reference(Checkpoint(checkpoint_factory(CONFIGS[name], seed=11)))
    unwindowed = MixtralDecoder(windowed.config.replace(sliding_window=None))
    unwindowed.load_state_dict(windowed.state_dict())
    ids, mask = prompt(windowed.config.vocab_size)
    with_window, _ = windowed(ids, mask, positions(mask), windowed.empty_cache(2))
    without_window, _ = unwindowed.eval()(ids, mask, positions(mask), unwindowed.empty_cache(2))
    assert (with_window[0, -1] - without_window[0, -1]).abs().max() > 1e-3


# -- reference vs Hugging Face in half precision --------------------------------------------------

# Both sides round to the same dtype, but not at the same points (the reference softmaxes attention
# and accumulates the MoE in float32; Hugging Face rounds scores and expert outputs to the dtype):
# the check is that the half-precision path runs and stays close, not bit parity.
HALF_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_weights_match_hf(dtype, checkpoint_factory):
    config = CONFIGS["E4-k2-gqa2-hd16-window4-tied"].replace(dtype=str(dtype).removeprefix("torch."))
    result = rollout(checkpoint_factory(config, seed=11), dtype)
    for step, (ref, hf, real) in enumerate(zip(result.ref_logits, result.hf_logits, result.real)):
        assert ref.dtype == torch.float32
        assert torch.isfinite(ref).all()
        diff = (ref - hf).abs()[real].max().item()
        assert diff < HALF_TOLERANCE[dtype], f"step {step}: max |ref - hf| = {diff:.3g}"
    assert result.ref_present[0][0].dtype == dtype


# -- the MoE op against a naive per-token float64 loop --------------------------------------------

def naive_moe(x, router_logits, w_gate_up, w_down, top_k, normalize):
    """The MoE op's definition, token by token, in float64."""
    x, w_gate_up, w_down = x.double(), w_gate_up.double(), w_down.double()
    inter = w_gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        p = torch.softmax(router_logits[n].double(), dim=-1)
        chosen = sorted(range(p.numel()), key=lambda e: (-p[e].item(), e))[:top_k]
        weights = p[chosen] / p[chosen].sum() if normalize else p[chosen]
        for w, e in zip(weights, chosen):
            gate, up = w_gate_up[e, :inter] @ x[n], w_gate_up[e, inter:] @ x[n]
            out[n] += w * (w_down[e] @ (F.silu(gate) * up))
    return out


def moe_inputs(tokens, hidden, inter, experts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, experts, generator=g).to(dtype)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    return x, logits, w_gate_up, w_down


# (tokens N, hidden H, intermediate I, experts E, top_k K, normalize): irregular sizes, a single
# token (most experts get nothing), K = 1 and K = E.
MOE_CASES = [
    (1, 24, 20, 8, 2, True),
    (13, 24, 20, 4, 2, True),
    (13, 24, 20, 4, 2, False),
    (29, 17, 11, 8, 3, True),
    (29, 17, 11, 8, 3, False),
    (7, 16, 9, 2, 1, True),
    (7, 16, 9, 5, 5, False),
]


@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k,normalize", MOE_CASES)
def test_moe_reference_matches_naive_loop(tokens, hidden, inter, experts, top_k, normalize):
    args = moe_inputs(tokens, hidden, inter, experts)
    out = moe_reference(*args, top_k, normalize)
    assert out.dtype == torch.float32 and out.shape == (tokens, hidden)
    torch.testing.assert_close(out.double(), naive_moe(*args, top_k, normalize), atol=1e-5, rtol=1e-5)


def test_moe_reference_float64_inputs():
    args = moe_inputs(13, 24, 20, 4, dtype=torch.float64)
    out = moe_reference(*args, 2, True)
    assert out.dtype == torch.float64
    # Experts accumulate in float64 here, but `route` softmaxes in float32 (the op's contract), so
    # the routing weights carry float32 rounding: ~1e-7 relative, far above float64's.
    torch.testing.assert_close(out, naive_moe(*args, 2, True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_moe_reference_half_inputs(dtype):
    args = moe_inputs(13, 24, 20, 4, dtype=dtype)
    out = moe_reference(*args, 2, True)
    assert out.dtype == dtype
    # Only the final rounding to the dtype differs from the float64 loop on the same (rounded) inputs.
    torch.testing.assert_close(out.double(), naive_moe(*args, 2, True), atol=2e-2, rtol=2e-2)


def test_unnormalized_weights_are_the_softmax_probabilities():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    weights, experts = route(logits, 2, normalize=False)
    p = torch.softmax(logits, dim=-1)
    assert experts.tolist() == [[1, 3]]
    torch.testing.assert_close(weights, p[:, [1, 3]])
    weights, _ = route(logits, 2, normalize=True)
    torch.testing.assert_close(weights, p[:, [1, 3]] / p[:, [1, 3]].sum())


def test_route_breaks_exact_ties_toward_lower_index():
    logits = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],  # all tied
        [1.0, 3.0, 3.0, 3.0],  # three tied for first
        [5.0, 5.0, 1.0, 5.0],  # tie at 0, 1, 3
        [2.0, 1.0, 2.0, 1.0],  # tie for first and for second
        [-1.0, 4.0, 0.0, 4.0],
    ])
    weights, experts = route(logits, 3)
    assert experts.tolist() == [[0, 1, 2], [1, 2, 3], [0, 1, 3], [0, 2, 1], [1, 3, 2]]
    assert weights.dtype == torch.float32 and experts.dtype == torch.int64
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    _, experts = route(logits, 1)
    assert experts.tolist() == [[0], [1], [0], [0], [1]]


@pytest.mark.parametrize("normalize", [True, False])
def test_moe_reference_with_exact_ties_matches_naive_loop(normalize):
    x, _, w_gate_up, w_down = moe_inputs(6, 16, 12, 6, seed=3)
    # Integer-valued logits with repeats: exact ties at the top-k boundary in every row.
    logits = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 2, 2, 0, 2, 1], [3, 0, 3, 3, 0, 0],
                           [1, 2, 1, 2, 1, 2], [0, 0, 0, 0, 5, 5], [4, 1, 1, 1, 1, 4]], dtype=torch.float32)
    out = moe_reference(x, logits, w_gate_up, w_down, 2, normalize)
    torch.testing.assert_close(out.double(), naive_moe(x, logits, w_gate_up, w_down, 2, normalize),
                               atol=1e-5, rtol=1e-5)
    # The tie-break is visible: the same rows routed to the higher tied index would differ.
    flipped = moe_reference(x, logits.flip(-1), w_gate_up.flip(0), w_down.flip(0), 2, normalize)
    assert (out - flipped).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_moe_reference_batches_computes_each_batch_as_alone(dtype):
    # Steps of a scenario: batches of different sizes sharing the experts; one routes nowhere near
    # expert 3, so its weights are fetched only for the batches that use it.
    batches = [moe_inputs(n, 24, 20, 4, dtype=dtype, seed=n)[:2] for n in (1, 13, 6)]
    _, _, w_gate_up, w_down = moe_inputs(1, 24, 20, 4, dtype=dtype, seed=99)
    fetched = []

    def experts(e):
        fetched.append(e)
        return w_gate_up[e], w_down[e]

    batches[0] = (batches[0][0], torch.tensor([[5.0, 4.0, -9.0, -9.0]], dtype=dtype))
    outs = moe_reference_batches(batches, experts, 4, 2)
    for (x, logits), out in zip(batches, outs):
        # Bit for bit what the batch gives alone: validation may run every step at once.
        assert torch.equal(out, moe_reference(x, logits, w_gate_up, w_down, 2))
    assert fetched == sorted(set(fetched)), "each expert's weights are fetched once"
    used = {int(e) for _, logits in batches for e in route(logits, 2)[1].flatten()}
    assert set(fetched) == used
