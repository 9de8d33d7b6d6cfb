"""The PyTorch reference decoder: the parity oracle every artifact is validated against.

Dimension legend: B batch, S sequence (new tokens), P past length, T = P + S, H hidden,
I intermediate, E experts, K top-k, N tokens (= B*S), V vocab, D head dim, KVH key/value heads.

The KV cache is explicit, as in the graph I/O contract: `past[i] = (key, value)` each
[B, KVH, P, D] go in, `present[i]` each [B, KVH, T, D] come out; keys are stored after RoPE.
`attention_mask` [B, T] marks real tokens (1) and padding (0) over past + current, so left
padding works; `position_ids` [B, S] are given by the caller.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from mixexport.checkpoint import names
from mixexport.checkpoint.config import MixtralConfig
from mixexport.dtypes import torch_dtype
from mixexport.model.moe import moe_reference

# The MoE op's signature: (x [N, H], router_logits [N, E], w_gate_up [E, 2I, H], w_down [E, H, I],
# top_k, normalize) -> [N, H]. Capture swaps in a custom op with this signature.
MoEImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool], torch.Tensor]
KVCache = Sequence[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the model dtype: what Hugging Face's MixtralRMSNorm does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, S, D] for the default RoPE, computed in fp32 and cast to the model dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; cos/sin [B, S, D]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_bias_mask(attention_mask: torch.Tensor, seq_len: int, sliding_window: int | None) -> torch.Tensor:
    """Which keys each query may see: bool [B, 1, S, T].

    Query s sits at cache index P + s (P = T - S). It sees key j when j <= P + s, the key is a real
    token, and, with a sliding window W, when (P + s) - j < W (Hugging Face's convention).
    """
    total = attention_mask.shape[1]
    key_idx = torch.arange(total, device=attention_mask.device)  # [T]
    query_idx = key_idx[total - seq_len:]  # [S]
    diff = query_idx[:, None] - key_idx[None, :]  # [S, T]
    allowed = diff >= 0
    if sliding_window is not None:
        allowed = allowed & (diff < sliding_window)
    return allowed[None, None] & attention_mask[:, None, None, :].bool()


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, allowed, past_key, past_value):
        c = self.config
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, c.num_attention_heads, c.head_dim).transpose(1, 2)  # [B, Hq, S, D]
        k = self.k_proj(x).view(bsz, seq, c.num_key_value_heads, c.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        v = self.v_proj(x).view(bsz, seq, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key = torch.cat([past_key, k], dim=2)  # [B, KVH, T, D]
        value = torch.cat([past_value, v], dim=2)
        # Query heads are grouped: head h reads KV head h // G, so repeat each KV head G times.
        k_rep = key.repeat_interleave(c.num_groups, dim=1)  # [B, Hq, T, D]
        v_rep = value.repeat_interleave(c.num_groups, dim=1)
        scores = (q.float() @ k_rep.float().transpose(-1, -2)) * c.head_dim**-0.5  # [B, Hq, S, T]
        # A finite minimum, not -inf: a padding query with no visible key gets uniform weights
        # instead of NaN, which would otherwise leak into the cache and later tokens.
        scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        out = (probs @ v_rep.float()).to(x.dtype)  # [B, Hq, S, D]
        out = out.transpose(1, 2).reshape(bsz, seq, c.num_attention_heads * c.head_dim)
        return self.o_proj(out), key, value


class MoEBlock(nn.Module):
    """Router + experts; the experts are stacked [E, ...] and computed by one MoE op call."""

    def __init__(self, config: MixtralConfig, moe_impl: MoEImpl) -> None:
        super().__init__()
        c = config
        self.top_k = c.num_experts_per_tok
        self.moe_impl = moe_impl
        self.gate = nn.Linear(c.hidden_size, c.num_local_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(c.num_local_experts, 2 * c.intermediate_size, c.hidden_size))
        self.w_down = nn.Parameter(torch.empty(c.num_local_experts, c.hidden_size, c.intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, hidden = x.shape
        flat, router_logits = self._routed(x)
        return self.moe_impl(flat, router_logits, self.w_gate_up, self.w_down, self.top_k, True).reshape(bsz, seq, hidden)

    def forward_batches(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`forward` of each of `xs` [B, S, H] (independent batches, e.g. the steps of a scenario).

        An implementation with a `batches(routed, w_gate_up, w_down, top_k, normalize)` method (as
        `moe_reference_batches`: each expert's weights read once for all batches) computes them
        together; any other is called once per batch.
        """
        routed = [self._routed(x) for x in xs]
        batches = getattr(self.moe_impl, "batches", None)
        if batches is not None:
            outs = batches(routed, self.w_gate_up, self.w_down, self.top_k, True)
        else:
            outs = [self.moe_impl(flat, logits, self.w_gate_up, self.w_down, self.top_k, True) for flat, logits in routed]
        return [out.reshape(*x.shape) for out, x in zip(outs, xs)]

    def _routed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> (flat [N, H], router logits [N, E])."""
        bsz, seq, hidden = x.shape  # explicit sizes: what capture has always traced
        flat = x.reshape(bsz * seq, hidden)  # [N, H]
        # Router logits in the model dtype, as Hugging Face computes them; the op softmaxes in fp32.
        return flat, self.gate(flat)


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, moe_impl: MoEImpl) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = MoEBlock(config, moe_impl)

    def forward(self, h, cos, sin, allowed, past_key, past_value):
        h, key, value = self.attend(h, cos, sin, allowed, past_key, past_value)
        return h + self.moe(self.post_attention_layernorm(h)), key, value

    def attend(self, h, cos, sin, allowed, past_key, past_value):
        """The attention half of the layer: (residual stream after attention, present key, value)."""
        attn, key, value = self.self_attn(self.input_layernorm(h), cos, sin, allowed, past_key, past_value)
        return h + attn, key, value

    def feed_forward_batches(self, hs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The MoE half of `forward` for several independent batches (`attend`'s outputs) at once:
        a step's MoE input does not depend on another step's MoE, only on its attention, so
        validation runs a layer's attention step by step, then its MoE for all steps together."""
        return [h + out for h, out in zip(hs, self.moe.forward_batches([self.post_attention_layernorm(h) for h in hs]))]


class MixtralDecoder(nn.Module):
    """Mixtral decoder with an explicit KV cache.

    Args:
        config: model shapes.
        moe_impl: the MoE op implementation (default: the reference; capture passes a custom op).
    """

    def __init__(self, config: MixtralConfig, moe_impl: MoEImpl = moe_reference) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, moe_impl) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        attention_mask: torch.Tensor,  # [B, T] int64
        position_ids: torch.Tensor,  # [B, S] int64
        past: KVCache,  # L x ([B, KVH, P, D], [B, KVH, P, D])
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Returns (logits [B, S, V] float32, present: L x ([B, KVH, T, D], [B, KVH, T, D]))."""
        c = self.config
        h = self.embed_tokens(input_ids)  # [B, S, H]
        cos, sin = rotary_cos_sin(position_ids, c.head_dim, c.rope_theta, h.dtype)
        allowed = attention_bias_mask(attention_mask, input_ids.shape[1], c.sliding_window)
        present = []
        for layer, (past_key, past_value) in zip(self.layers, past):
            h, key, value = layer(h, cos, sin, allowed, past_key, past_value)
            present.append((key, value))
        logits = self.lm_head(self.norm(h)).float()
        return logits, present

    def empty_cache(self, batch: int, device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A zero-length (P = 0) cache for a prefill."""
        c = self.config
        shape = (batch, c.num_key_value_heads, 0, c.head_dim)
        dtype = self.embed_tokens.weight.dtype
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(c.num_hidden_layers)]


def parameter_sources(config: MixtralConfig) -> dict[str, Callable]:
    """Model parameter name -> function (checkpoint, dtype) -> tensor.

    The one mapping from checkpoint tensors to the reference model's parameters (and so to the
    captured graph's initializers, which keep these names).
    """
    def plain(ckpt_name):
        return lambda ckpt, dtype: ckpt.tensor(ckpt_name, dtype)

    sources = {
        "embed_tokens.weight": plain("model.embed_tokens.weight"),
        "norm.weight": plain("model.norm.weight"),
        "lm_head.weight": plain("lm_head.weight"),  # the reader resolves tied embeddings
    }
    layer_map = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attn.q_proj.weight": "self_attn.q_proj.weight",
        "self_attn.k_proj.weight": "self_attn.k_proj.weight",
        "self_attn.v_proj.weight": "self_attn.v_proj.weight",
        "self_attn.o_proj.weight": "self_attn.o_proj.weight",
        "moe.gate.weight": "block_sparse_moe.gate.weight",
    }
    for i in range(config.num_hidden_layers):
        for param, ckpt_name in layer_map.items():
            sources[f"layers.{i}.{param}"] = plain(names.PREFIX.format(i=i) + ckpt_name)
    for name, (_, part) in expert_sources(config).items():
        sources[name] = lambda ckpt, dtype, part=part: ckpt.stack_experts(
            lambda e, out: part(ckpt, dtype, e, out))
    return sources


def expert_sources(config: MixtralConfig) -> dict[str, tuple[int, Callable]]:
    """Stacked expert parameter name -> (E, function (checkpoint, dtype, expert[, out]) -> one expert's
    slice, read into `out` when given: `Checkpoint.stack_experts` reads each expert into its slot).

    Later stages stream these one expert at a time instead of materialising [E, ...] stacks.
    """
    sources = {}
    for i in range(config.num_hidden_layers):
        sources[f"layers.{i}.moe.w_gate_up"] = (
            config.num_local_experts, lambda ckpt, dtype, e, out=None, i=i: ckpt.gate_up_expert(i, e, dtype, out))
        sources[f"layers.{i}.moe.w_down"] = (
            config.num_local_experts, lambda ckpt, dtype, e, out=None, i=i: ckpt.down_expert(i, e, dtype, out))
    return sources


def load_reference(checkpoint, dtype: str | torch.dtype | None = None, moe_impl: MoEImpl = moe_reference,
                   device: str = "cpu") -> MixtralDecoder:
    """Build the reference decoder with weights from a `Checkpoint`, one tensor at a time.

    Args:
        checkpoint: a `mixexport.checkpoint.Checkpoint`.
        dtype: weights dtype (default: the checkpoint's).
        moe_impl: MoE op implementation.
        device: where the weights go.
    """
    config = checkpoint.config
    dtype = torch_dtype(dtype or config.dtype)
    with torch.device("meta"):
        model = MixtralDecoder(config, moe_impl)
    sources = parameter_sources(config)
    state = {name: source(checkpoint, dtype).to(device) for name, source in sources.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()
