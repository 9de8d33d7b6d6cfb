"""Prefill and per-token decode latency on CPU: our artifacts vs the PyTorch models, side by side.

    python benchmarks/decode_speed.py [--configs small mid] [--batches 1 8] [--steps 16]
                                      [--prompt 32] [--workdir DIR] [--skip-hf-onnx] [--quant int8 int4]
                                      [--dtypes float16] [--llama-cpp DIR] [--rounds N]
                                      [--processes N] [--ort-moe-library LIB]

For each config (the `small` preset, and `mid`: hidden 512, intermediate 1792, 8 layers, 8 heads,
2 KV heads, 8 experts, top-2, vocab 32000, fp32) it writes a random checkpoint, builds the
`portable` and `ort` targets with `mixexport build --no-validate`, and times, at each batch size,
a prefill of --prompt tokens and --steps greedy-style decode steps through the KV cache for:

- reference:      `mixexport.model.load_reference` (torch, our PyTorch reference)
- hf eager:       transformers `MixtralForCausalLM.from_pretrained` (attn eager, default experts)
- hf onnx (ort):  a plain `torch.onnx.export(..., dynamo=True)` of transformers' Mixtral with
                  `experts_implementation="batched_mm"`, run in onnxruntime
- ours portable / ours ort: the mixexport artifacts in onnxruntime (CPU EP); `ours ort` is built
                  for the CPU provider (the default, one If per expert); `ours ort fused` is the
                  same graph built with `--ort-provider cuda` (one com.microsoft.MoE per layer),
                  timed on CPU beside it; `ours ort shared` is built with `--kv-layout shared`
                  (GroupQueryAttention over static KV buffers, bound in place as genai binds them);
                  `ours ort op` (--ort-moe-library LIB) is built with the CPU MoE op library of
                  plugins/ort_moe (one mixexport.ort.MoE node per layer, every chosen expert's rows
                  split over both threads) and its session loads LIB; `ours ort op (genai)` is
                  that folder in onnxruntime-genai, which loads the copy its config names.
                  Every onnxruntime row runs through `mixexport generate`'s plain loop
                  (`runtime.generate.KvLoop`)
- ours portable fp16 / ours ort fp16: the same in float16 (--dtypes), which onnxruntime's x86 CPU
                  provider runs through float32 copies
- ours portable int8 / ours ort int4-g32 ...: the same, built with `--experts-quant` (--quant;
  int4 with group 32), each with its export time and artifact size, and its top-1 agreement with
  the reference over --steps teacher-forced decode steps at batch 1 (every step's input token is
  the reference's greedy token; a step agrees when both pick the same next token)
- peers of the same weights (issue 14's targets), each skipped with the reason when its package or
  tool is missing, with its top-1 agreement like ours; batch 1 only but for the builder-style graph:
  - ours ort (genai): onnxruntime-genai over the `ort` folder with the genai_config.json the build
                  wrote; decode ms is its own greedy loop (generate_next_token, one model run each)
  - genai-builder-style: the graph onnxruntime-genai's model builder writes for MoE models (fused QKV
                  MatMul, SkipSimplifiedLayerNormalization, GroupQueryAttention with do_rotary, one
                  com.microsoft.MoE per layer), written here with onnx.helper from the checkpoint and
                  checked against the reference's logits (prefill + 3 steps, 1e-4 of their range)
                  before it is timed; its builder has no Mixtral
  - llama.cpp f32 / q8_0 / q4_0: llama-cpp-python's low-level API (n_threads 2, KV cache float32,
                  one llama_decode per new token) over a GGUF that llama.cpp's own converter makes
                  from the same checkpoint (--llama-cpp: a llama.cpp tree, e.g. vendor/llama.cpp of
                  the llama-cpp-python sdist; the converter needs sentencepiece), and over
                  llama_model_quantize's q8_0 / q4_0 of it beside --quant int8 / int4 (llama.cpp's
                  default mixture: every matrix quantized, not only the experts as ours; "x limit"
                  counts the GGUF's own tensor bytes; loaded without llama.cpp's extra CPU buffer
                  types, since its AMX kernel crashes on this VM: no repacked kernels either)

torch uses 2 threads, onnxruntime intra_op_num_threads=2. Decode ms is the median over --steps
steps (after 3 warmup steps), one new token per sequence per step; with --rounds N every row is
timed N times, row after row, and keeps its lowest prefill and decode medians; with --processes N
the whole benchmark runs N times, each in its own process, and a last table gives every row's
decode ms over them and its ratio to ours ort and to llama.cpp f32 in each (the spread between
processes on these VMs is larger than within one). "x limit" compares with the
bandwidth limit of one step: the bytes a step must bring from DRAM / DRAM read bandwidth. The bytes
are the active weight bytes less what the CPU caches hold (a step rereads the same weights in the
same order, and up to the caches' size of them can still be on chip from the step before). The
bandwidth is a torch sum over a 2 GiB buffer with 1 and 2 threads, best of 5, measured at the
start and again before every later round, the highest kept (rows keep their lowest times; it
drifts with the VM's neighbours). Without either correction, rows beat the "limit" by up to 1.4x
in one run on a 2-core VM (32 MiB L3, 263 MB of weights a step, 40.8-60.1 GB/s).
At batch B the active expert bytes assume uniform
routing: each layer reads E * (1 - (1 - k/E)^B) distinct experts. The fp16 rows' limit is the float32
one: onnxruntime's x86 CPU provider reads float32 copies of their weights.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

THREADS = 2
WARMUP = 3
PREFILL_REPEATS = 3
TARGET_STEPS = 16  # the issue's top-1 agreement targets count 16 teacher-forced steps


# -- configs and machine -------------------------------------------------------------------------

def make_config(name: str):
    from mixexport.checkpoint import preset
    if name == "small":
        return preset("small")
    if name == "mid":
        return preset("small").replace(hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                       num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                                       dtype="float32")
    raise SystemExit(f"unknown config {name!r}")


def dram_bandwidth() -> float:
    """Read bandwidth in bytes/s: the best of 5 torch sums over a 2 GiB fp32 buffer, with 1 and 2
    threads. (numpy's pairwise sum is compute-bound on this VM, ~20 GB/s, and would make a "limit"
    that the artifacts beat.)"""
    buf = torch.ones(2 * 1024**3 // 4, dtype=torch.float32)
    best = float("inf")
    for threads in (1, THREADS):
        torch.set_num_threads(threads)
        for _ in range(5):
            t = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t)
    torch.set_num_threads(THREADS)
    del buf
    return 2 * 1024**3 / best


def cpu_caches() -> int:
    """Bytes of data the machine's CPU caches can hold: every data or unified cache sysfs lists, each
    shared instance once (0 where it lists none). Counting every level, not only the last, keeps
    the limit a bound on CPUs whose L3 does not hold what L2 holds (AMD's is a victim cache)."""
    instances = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            kind, level, shared, size = (
                (index / name).read_text().strip() for name in ("type", "level", "shared_cpu_list", "size"))
        except OSError:
            continue
        digits, scale = size.rstrip("KMG"), {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1:], 1)
        if kind in ("Data", "Unified") and digits.isdigit():
            instances[(level, shared)] = int(digits) * scale
    return sum(instances.values())


def dram_bytes(active: float, cache: int) -> float:
    """What a step must bring from DRAM: at most `cache` bytes of its weights are still on chip."""
    return max(active - cache, 0.0)


def active_bytes(c, batch: int, quant=None) -> float:
    """Weight bytes one decode step must read (one embedding row per sequence); `quant` (a QuantScheme):
    experts at bits/8 bytes per weight plus one model-dtype scale per group, the rest in the model dtype."""
    item = 4 if c.dtype == "float32" else 2
    H, I, E, K = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok
    attn = H * c.num_attention_heads * c.head_dim * 2 + H * c.num_key_value_heads * c.head_dim * 2
    experts = E * (1 - (1 - K / E) ** batch)
    per_expert = 3 * H * I * item
    if quant is not None:
        per_expert = 3 * H * I * quant.bits / 8 + item * (2 * I * H // quant.group(H) + H * I // quant.group(I))
    per_layer = item * (attn + H * E + 2 * H) + experts * per_expert
    return c.num_hidden_layers * per_layer + item * (c.vocab_size * H + H + batch * H)


def machine_info() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    import transformers
    return (f"machine: {os.cpu_count()} cores, {mem:.1f} GiB, {platform.platform()}\n"
            f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
            f"transformers {transformers.__version__}; torch threads {THREADS}, ORT intra_op {THREADS}")


# -- runners: each has prefill(ids, mask, pos) -> (last logits, state) and step(ids, mask, pos, state) --

class RefRunner:
    def __init__(self, ckpt_dir: Path):
        from mixexport.checkpoint import Checkpoint
        from mixexport.model import load_reference
        self.model = load_reference(Checkpoint(ckpt_dir))

    @torch.no_grad()
    def prefill(self, ids, mask, pos):
        logits, present = self.model(ids, mask, pos, self.model.empty_cache(ids.shape[0]))
        return logits, present

    @torch.no_grad()
    def step(self, ids, mask, pos, state):
        return self.model(ids, mask, pos, state)


class HFRunner:
    def __init__(self, ckpt_dir: Path):
        from transformers import MixtralForCausalLM
        self.model = MixtralForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()

    @torch.no_grad()
    def prefill(self, ids, mask, pos):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits, cache

    @torch.no_grad()
    def step(self, ids, mask, pos, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits, cache


class OrtRunner:
    """Any graph with mixexport's I/O names (our targets, and the plain HF export, named alike),
    run as `mixexport generate`'s plain loop runs it (`runtime.generate.KvLoop`: an IOBinding that
    keeps the cache in onnxruntime values; a shared-layout graph's static buffers updated in place)."""

    def __init__(self, onnx_path: Path, num_layers: int, kv_heads: int, head_dim: int, kv_layout: str = "concat",
                 buffer_length: int = 0, library: Path | None = None):
        from mixexport.runtime.generate import open_session
        # Without the CPU arena, as `generate`: the concat presents grow by a token a step and the
        # arena serves those allocations slower than plain malloc (mid, batch 1: 18.9 -> 17.3
        # ms/token without it, where genai's own loop over the same graph took 17.3).
        self.sess = open_session(onnx_path, THREADS, library)
        past = next(i for i in self.sess.get_inputs() if i.name.startswith("past_key_values."))
        self.past_dtype = np.float16 if past.type == "tensor(float16)" else np.float32
        self.L, self.kv_shape, self.kv_layout, self.buffer_length = num_layers, (kv_heads, head_dim), kv_layout, buffer_length

    @staticmethod
    def _run(loop, ids, mask, pos):
        return torch.from_numpy(loop.run(ids.numpy(), mask.numpy(), pos.numpy())), loop

    def prefill(self, ids, mask, pos):
        from mixexport.runtime.generate import KvLoop
        loop = KvLoop(self.sess, self.L, self.kv_shape, self.past_dtype, self.kv_layout, self.buffer_length,
                      batch=ids.shape[0])
        return self._run(loop, ids, mask, pos)

    def step(self, ids, mask, pos, loop):
        return self._run(loop, ids, mask, pos)


# -- the plain transformers export ---------------------------------------------------------------

def export_hf_plain(ckpt_dir: Path, out_path: Path) -> None:
    """torch.onnx.export(dynamo=True) of transformers' Mixtral (batched_mm experts), KV cache as tensors."""
    from transformers import DynamicCache, MixtralForCausalLM
    model = MixtralForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="sdpa",
                                               experts_implementation="batched_mm").eval()
    cfg = model.config
    L, kvh = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=cfg)
            for i in range(L):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            flat = []
            for i in range(L):
                layer = out.past_key_values.layers[i]
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    B, S, P = 2, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    mask = torch.ones(B, P + S, dtype=torch.int64)
    pos = torch.arange(P, P + S)[None].expand(B, S).contiguous()
    past = [torch.randn(B, kvh, P, d) for _ in range(2 * L)]
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=4096)
    past_len, total = torch.export.Dim("past", max=8192), torch.export.Dim("total", max=8192)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
           "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len} for _ in range(2 * L)]}
    in_names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    with torch.no_grad():
        prog = torch.onnx.export(Wrapper(model), (ids, mask, pos, past), dynamo=True, dynamic_shapes=dyn,
                                 input_names=in_names, output_names=out_names, external_data=True,
                                 optimize=True, verbose=False)
    prog.save(str(out_path), external_data=True)


# -- peers: onnxruntime-genai, a genai-builder-style graph, llama.cpp ------------------------------

class Skipped(Exception):
    """A peer row that cannot run here (its package or tool is missing): printed as skipped, with why."""


class GenaiRunner:
    """onnxruntime-genai over our `ort` folder, reading the genai_config.json the build wrote beside
    the graph (threads set like every other row, through a config overlay). prefill/step append the
    given tokens (teacher forcing, for the agreement line); `timed` runs genai's own greedy loop."""

    batch_one_only = True

    def __init__(self, folder: Path):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise Skipped("onnxruntime-genai is not installed (pip install 'mixexport[genai]')") from None
        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": THREADS, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def _generator(self, **search):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(batch_size=1, do_sample=False, **search)
        return self.og.Generator(self.model, params)

    @staticmethod
    def _append(generator, ids):
        generator.append_tokens(ids.numpy().astype(np.int32))
        return torch.from_numpy(np.array(generator.get_logits())), generator  # [1, 1, V]: the last token's

    def prefill(self, ids, mask, pos):
        return self._append(self._generator(), ids)

    def step(self, ids, mask, pos, generator):
        return self._append(generator, ids)

    def timed(self, ids: torch.Tensor, steps: int) -> tuple[float, float]:
        """(prefill ms median, decode ms/step median) of genai's generator loop: append_tokens(prompt),
        then generate_next_token. The first call after the prompt only picks from the prompt's logits;
        each later one runs the model on the token picked before (one decode step) and picks again.
        min_length = max_length keeps an end-of-sequence pick from ending the loop early."""
        length = ids.shape[1] + WARMUP + steps + 2
        prefill_times = []
        for _ in range(PREFILL_REPEATS + 1):
            generator = self._generator(max_length=length, min_length=length)
            t = time.perf_counter()
            generator.append_tokens(ids.numpy().astype(np.int32))
            prefill_times.append(time.perf_counter() - t)
        generator.generate_next_token()
        step_times = []
        for _ in range(WARMUP + steps):
            t = time.perf_counter()
            generator.generate_next_token()
            step_times.append(time.perf_counter() - t)
        return statistics.median(prefill_times[1:]) * 1e3, statistics.median(step_times[WARMUP:]) * 1e3


def _external_initializer(name: str, array: np.ndarray, data, location: str):
    """An initializer whose bytes go to the open external-data file `data` (page aligned): the
    graph is written one tensor at a time, never holding the weights twice in memory."""
    from onnx import TensorProto, helper
    data.write(b"\0" * (-data.tell() % 4096))
    offset = data.tell()
    array = np.ascontiguousarray(array)
    data.write(array.tobytes())
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def write_genai_style_graph(ckpt_dir: Path, out_path: Path) -> None:
    """The decoder as onnxruntime-genai's model builder writes its MoE models (the builder has no
    Mixtral, so this is the graph a user would otherwise hand-build): Gather embedding;
    SimplifiedLayerNormalization, then SkipSimplifiedLayerNormalization carrying the residual; one
    fused QKV MatMul; GroupQueryAttention with its own rotary (do_rotary, cos/sin caches) and
    seqlens_k / total_sequence_length from the attention mask; o_proj MatMul; router MatMul and one
    com.microsoft.MoE per layer (fc1 [E, 2I, H] gate/up rows interleaved for swiglu_fusion=1, fc2
    [E, H, I]); final SkipSimplifiedLayerNormalization and the lm_head MatMul. Our I/O names, less
    position_ids (GroupQueryAttention derives positions from seqlens_k), fp32."""
    import onnx
    from onnx import TensorProto, helper

    from mixexport.checkpoint import Checkpoint
    ck = Checkpoint(ckpt_dir)
    c = ck.config
    H, D, E = c.hidden_size, c.head_dim, c.num_local_experts
    ms = "com.microsoft"
    nodes, inits = [], [helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                        helper.make_tensor("one_scalar", TensorProto.INT64, [], [1]),
                        helper.make_tensor("rows_by_hidden", TensorProto.INT64, [2], [-1, H])]
    location = out_path.name + ".data"

    def node(op, inputs, outputs, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{outputs[0]}/{op}", domain=domain, **attrs))
        return outputs

    with open(out_path.with_name(location), "wb") as data:
        def weight(name, array):
            inits.append(_external_initializer(name, np.asarray(array, np.float32), data, location))
            return name

        def param(name):  # a checkpoint tensor as stored ([out, in] for a projection)
            return weight(name, ck.tensor(name, "float32").numpy())

        def matmul_weight(name):  # [out, in] -> [in, out], what MatMul reads
            return ck.tensor(name, "float32").numpy().T

        node("ReduceSum", ["attention_mask", "one"], ["tokens_so_far"], keepdims=0)
        node("Sub", ["tokens_so_far", "one"], ["seqlens_k_i64"])
        node("Cast", ["seqlens_k_i64"], ["seqlens_k"], to=TensorProto.INT32)
        node("Shape", ["attention_mask"], ["mask_shape"])
        node("Gather", ["mask_shape", "one_scalar"], ["total_i64"], axis=0)
        node("Cast", ["total_i64"], ["total_sequence_length"], to=TensorProto.INT32)
        inverse = 1.0 / (c.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
        angles = np.outer(np.arange(c.max_position_embeddings, dtype=np.float64), inverse)  # [max_pos, D/2]
        weight("cos_cache", np.cos(angles))
        weight("sin_cache", np.sin(angles))
        (x,) = node("Gather", [param("model.embed_tokens.weight"), "input_ids"], ["embeds"], axis=0)
        residual = None
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            if residual is None:
                (h,) = node("SimplifiedLayerNormalization", [x, param(f"{p}.input_layernorm.weight")],
                            [f"{p}/attn_norm"], axis=-1, epsilon=c.rms_norm_eps, stash_type=1)
                residual = x
            else:
                h, _, _, residual = node("SkipSimplifiedLayerNormalization",
                                         [x, residual, param(f"{p}.input_layernorm.weight")],
                                         [f"{p}/attn_norm", "", "", f"{p}/attn_residual"], domain=ms,
                                         epsilon=c.rms_norm_eps)
            qkv = np.concatenate([matmul_weight(f"{p}.self_attn.{n}_proj.weight") for n in "qkv"], axis=1)
            node("MatMul", [h, weight(f"{p}.self_attn.qkv_proj", qkv)], [f"{p}/qkv"])
            node("GroupQueryAttention", [f"{p}/qkv", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                         "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
                 [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"], domain=ms,
                 num_heads=c.num_attention_heads, kv_num_heads=c.num_key_value_heads, do_rotary=1,
                 rotary_interleaved=0, scale=float(D) ** -0.5)
            (x,) = node("MatMul", [f"{p}/attn", weight(f"{p}.self_attn.o_proj", matmul_weight(
                f"{p}.self_attn.o_proj.weight"))], [f"{p}/o_proj"])
            h, _, _, residual = node("SkipSimplifiedLayerNormalization",
                                     [x, residual, param(f"{p}.post_attention_layernorm.weight")],
                                     [f"{p}/moe_norm", "", "", f"{p}/moe_residual"], domain=ms, epsilon=c.rms_norm_eps)
            node("Shape", [h], [f"{p}/moe_shape"])
            node("Reshape", [h, "rows_by_hidden"], [f"{p}/moe_rows"])  # [N, H]
            node("MatMul", [f"{p}/moe_rows", weight(f"{p}.router", matmul_weight(f"{p}.block_sparse_moe.gate.weight"))],
                 [f"{p}/router_logits"])
            gate_up = ck.gate_up(i, "float32").numpy()  # [E, 2I, H]: gate rows, then up rows
            inter = gate_up.shape[1] // 2
            fc1 = gate_up.reshape(E, 2, inter, H).transpose(0, 2, 1, 3).reshape(E, 2 * inter, H)
            node("MoE", [f"{p}/moe_rows", f"{p}/router_logits", weight(f"{p}.fc1", fc1), "",
                         weight(f"{p}.fc2", ck.down(i, "float32").numpy())], [f"{p}/moe_out"], domain=ms,
                 k=c.num_experts_per_tok, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)
            (x,) = node("Reshape", [f"{p}/moe_out", f"{p}/moe_shape"], [f"{p}/moe"])
        node("SkipSimplifiedLayerNormalization", [x, residual, param("model.norm.weight")], ["final_norm", "", "", ""],
             domain=ms, epsilon=c.rms_norm_eps)
        node("MatMul", ["final_norm", weight("lm_head", matmul_weight("lm_head.weight"))], ["logits"])

    def kv(name, length):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", c.num_key_value_heads, length, D])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size])]
    for i in range(c.num_hidden_layers):
        inputs += [kv(f"past_key_values.{i}.key", "past"), kv(f"past_key_values.{i}.value", "past")]
        outputs += [kv(f"present.{i}.key", "total"), kv(f"present.{i}.value", "total")]
    graph = helper.make_graph(nodes, "genai_builder_style_mixtral", inputs, outputs, initializer=inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ms, 1)]),
                    str(out_path))


def check_logits(runner, reference, prompt: int, vocab: int, steps: int = 3, tol: float = 1e-4) -> float:
    """The largest |runner - reference| of the last logits over the prefill and `steps` decode steps
    (both fed the reference's greedy tokens), relative to max |reference|; raises above `tol`."""
    ids = prompt_ids(1, prompt, vocab)
    mask, pos = torch.ones(1, prompt, dtype=torch.int64), torch.arange(prompt)[None]
    ours, ours_state = runner.prefill(ids, mask, pos)
    ref, ref_state = reference.prefill(ids, mask, pos)
    worst = 0.0
    for s in range(steps + 1):
        a, b = ours[:, -1].float(), ref[:, -1].float()
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
        if s == steps:
            break
        nxt = b.argmax(-1, keepdim=True)
        mask, pos = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], dim=1), pos[:, -1:] + 1
        ours, ours_state = runner.step(nxt, mask, pos, ours_state)
        ref, ref_state = reference.step(nxt, mask, pos, ref_state)
    if worst > tol:
        raise RuntimeError(f"logits differ from the reference by {worst:.1e} of their range (tolerance {tol:.0e})")
    return worst


# llama.cpp's file types beside our --quant schemes (llama-cpp-python's LLAMA_FTYPE_MOSTLY_* names)
LLAMA_CPP_QUANTS = {"int8": "q8_0", "int4": "q4_0"}
GGML_TYPE_F32 = 0


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level API over a GGUF of the same checkpoint:
    n_threads 2, one sequence, one llama_decode for the prefill and one per new token, the KV cache
    in float32 like our graphs' (llama.cpp's default is float16).

    `extra_buffers` False loads a quantized GGUF without llama.cpp's extra CPU buffer types: on this
    VM (Xeon with AMX) its AMX kernel crashes (SIGSEGV in ggml_backend_amx_mul_mat, llama-cpp-python
    0.3.36 built with GGML_NATIVE, q8_0 and q4_0 alike), and the switch that avoids it also turns
    off its repacked q4_0 / q8_0 kernels, so those rows are not llama.cpp at its best."""

    batch_one_only = True
    _log_sink = None  # the ctypes callback that keeps llama.cpp's load logs off stderr (kept alive here)

    def __init__(self, gguf_path: Path, n_ctx: int, extra_buffers: bool = True):
        import llama_cpp
        self.ll = llama_cpp
        if LlamaCppRunner._log_sink is None:
            LlamaCppRunner._log_sink = llama_cpp.llama_log_callback(lambda level, text, data: None)
            llama_cpp.llama_log_set(LlamaCppRunner._log_sink, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = THREADS
        params.type_k = params.type_v = GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {gguf_path}")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.path = gguf_path

    def _decode(self, tokens: list[int], start: int) -> torch.Tensor:
        """Decode `tokens` at positions start.. of sequence 0; the last one's logits [1, 1, V]."""
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        if self.ll.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab,))
        return torch.from_numpy(logits.copy()).view(1, 1, -1)

    def prefill(self, ids, mask, pos):
        if ids.shape[0] != 1:
            raise ValueError("batch 1 only")
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        return self._decode(ids[0].tolist(), 0), None

    def step(self, ids, mask, pos, state):
        return self._decode(ids[0].tolist(), int(pos[0, 0])), None


def gguf_active_bytes(path: Path, c, batch: int) -> float:
    """The bytes one decode step reads from a GGUF, counted as `active_bytes` counts ours: every
    tensor but the embedding, the stacked expert tensors (ffn_*_exps) at the share of experts a
    step reads under uniform routing."""
    from gguf import GGUFReader
    share = 1 - (1 - c.num_experts_per_tok / c.num_local_experts) ** batch
    return sum(int(t.n_bytes) * (share if "_exps" in t.name else 1)
               for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


def convert_to_gguf(llama_cpp_tree: Path, ckpt: Path, out: Path) -> None:
    """llama.cpp's own converter (its `convert_hf_to_gguf.py`) on our checkpoint, float32: the same
    weights (it reads the tokenizer `mixexport init` writes; it needs sentencepiece importable)."""
    script = llama_cpp_tree / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise Skipped(f"{script} not found: --llama-cpp names a llama.cpp source tree")
    done = subprocess.run([sys.executable, str(script), str(ckpt), "--outtype", "f32", "--outfile", str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {tail}")


def quantize_gguf(src: Path, out: Path, file_type: str) -> None:
    """llama.cpp's llama_model_quantize with its default mixture for `file_type` (q8_0, q4_0)."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}")
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {file_type} failed")


def add_peer_rows(add, name: str, c, ckpt: Path, cdir: Path, ort_folder: Path, args, runners: dict) -> list[str]:
    """Create the peer rows through `add` (which records a failure or skip and goes on): genai over
    our ort folder, the genai-builder-style graph (checked against the reference before it is
    timed), llama.cpp f32 and its quantized files beside our --quant schemes. Returns their labels."""
    add("ours ort (genai)", lambda: GenaiRunner(ort_folder))

    def builder_style():
        path = cdir / "genai_style" / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        write_genai_style_graph(ckpt, path)
        runner = OrtRunner(path, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        if "reference" not in runners:
            raise RuntimeError("no reference row to check its logits against")
        worst = check_logits(runner, runners["reference"], args.prompt, c.vocab_size)
        print(f"[{name}] genai-builder-style graph: logits within {worst:.1e} of the reference's range "
              f"(prefill + 3 decode steps)", flush=True)
        return runner
    add("genai-builder-style", builder_style)

    llama_labels = ["llama.cpp f32"] + [f"llama.cpp {LLAMA_CPP_QUANTS[q]}" for q in args.quant]
    reason = None
    if importlib.util.find_spec("llama_cpp") is None:
        reason = ("llama-cpp-python is not installed (CMAKE_ARGS=-DGGML_NATIVE=ON pip install "
                  "llama-cpp-python==0.3.36 builds it)")
    elif args.llama_cpp is None:
        reason = ("no --llama-cpp DIR (a llama.cpp source tree with convert_hf_to_gguf.py, e.g. vendor/llama.cpp of "
                  "the unpacked `pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`)")
    n_ctx = args.prompt + WARMUP + args.steps + 8
    f32 = cdir / "gguf" / "model-f32.gguf"

    def llama_f32():
        if reason:
            raise Skipped(reason)
        f32.parent.mkdir(exist_ok=True)
        t = time.perf_counter()
        convert_to_gguf(args.llama_cpp, ckpt, f32)
        print(f"[{name}] convert_hf_to_gguf.py --outtype f32: {time.perf_counter() - t:.0f} s, "
              f"{f32.stat().st_size / 1e6:.1f} MB", flush=True)
        return LlamaCppRunner(f32, n_ctx)
    add(llama_labels[0], llama_f32)

    for label, scheme in zip(llama_labels[1:], args.quant):
        def llama_quant(file_type=LLAMA_CPP_QUANTS[scheme]):
            if "llama.cpp f32" not in runners:
                raise Skipped(reason or "no f32 GGUF to quantize (the llama.cpp f32 row failed)")
            out = f32.with_name(f"model-{file_type}.gguf")
            t = time.perf_counter()
            quantize_gguf(f32, out, file_type)
            print(f"[{name}] llama_model_quantize {file_type}: {time.perf_counter() - t:.0f} s, "
                  f"{out.stat().st_size / 1e6:.1f} MB", flush=True)
            return LlamaCppRunner(out, n_ctx, extra_buffers=False)
        add(label, llama_quant)
    return ["ours ort (genai)", "genai-builder-style", *llama_labels]


# -- timing --------------------------------------------------------------------------------------

def prompt_ids(batch: int, prompt: int, vocab: int) -> torch.Tensor:
    """The prompt every row is timed and compared on: [batch, prompt] ids, seed 0, past the special ids."""
    return torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0))


def time_runner(runner, batch: int, prompt: int, steps: int, vocab: int) -> tuple[float, float]:
    """(prefill ms median, decode ms/step median)."""
    ids = prompt_ids(batch, prompt, vocab)
    mask = torch.ones(batch, prompt, dtype=torch.int64)
    pos = torch.arange(prompt)[None].expand(batch, prompt).contiguous()
    prefill_times = []
    for _ in range(PREFILL_REPEATS + 1):
        t = time.perf_counter()
        logits, state = runner.prefill(ids, mask, pos)
        prefill_times.append(time.perf_counter() - t)
    prefill_ms = statistics.median(prefill_times[1:]) * 1e3
    step_times = []
    nxt = logits[:, -1:].argmax(-1)
    for s in range(WARMUP + steps):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
        pos = pos[:, -1:] + 1
        t = time.perf_counter()
        logits, state = runner.step(nxt, mask, pos, state)
        dt = time.perf_counter() - t
        nxt = logits[:, -1:].argmax(-1)
        if s >= WARMUP:
            step_times.append(dt)
    return prefill_ms, statistics.median(step_times) * 1e3


def greedy_tokens(runner, prompt: int, steps: int, vocab: int, forced: list[torch.Tensor] | None = None):
    """Batch 1: the argmax token after the prefill and after each of `steps` decode steps; a
    step's input is `forced[s]` when given (teacher forcing), else the runner's own argmax."""
    ids = prompt_ids(1, prompt, vocab)
    mask = torch.ones(1, prompt, dtype=torch.int64)
    pos = torch.arange(prompt)[None]
    logits, state = runner.prefill(ids, mask, pos)
    picked = [logits[:, -1:].argmax(-1)]
    for s in range(steps):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], dim=1)
        pos = pos[:, -1:] + 1
        logits, state = runner.step(forced[s] if forced else picked[-1], mask, pos, state)
        picked.append(logits[:, -1:].argmax(-1))
    return picked


def time_rows(runners: dict, batch: int, args, vocab: int) -> dict:
    """One timing of every row at `batch`, row after row: (prefill ms, decode ms/step), or the line
    saying why there is none."""
    results = {}
    for label, runner in runners.items():
        if batch > 1 and getattr(runner, "batch_one_only", False):
            results[label] = "skipped: batch 1 only here"
            continue
        try:
            if hasattr(runner, "timed"):
                results[label] = runner.timed(prompt_ids(1, args.prompt, vocab), args.steps)
            else:
                results[label] = time_runner(runner, batch, args.prompt, args.steps, vocab)
        except Exception as exc:  # noqa: BLE001
            results[label] = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    return results


def best_of(a: dict, b: dict) -> dict:
    """Per row, the lower prefill and the lower decode median of two rounds: on a shared machine
    another job's burst inflates one row's round, and the rounds interleave the rows."""
    return {label: (min(r[0], b[label][0]), min(r[1], b[label][1])) if isinstance(r, tuple) and
            isinstance(b.get(label), tuple) else r for label, r in a.items()}


def run_config(name: str, args, work: Path, bandwidth: float) -> None:
    from mixexport.checkpoint import write_checkpoint
    c = make_config(name)
    cdir = work / name
    ckpt = cdir / "ckpt"
    cdir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(ckpt, c, seed=0)
    from mixexport.quant import parse_scheme
    exe = Path(sys.executable).with_name("mixexport")
    # (label suffix, experts' scheme, build options, targets) of each artifact built
    variants = [("", None, [], ("portable", "ort"))]
    variants += [(f" {parse_scheme(q).name}", parse_scheme(q), ["--experts-quant", q], ("portable", "ort"))
                 for q in args.quant]
    variants += [(" fp16", None, ["--dtype", "float16"], ("portable", "ort")) for d in args.dtypes if d == "float16"]
    variants.append((" shared", None, ["--kv-layout", "shared"], ("ort",)))
    variants.append((" fused", None, ["--ort-provider", "cuda"], ("ort",)))
    if args.ort_moe_library:
        variants.append((" op", None, ["--ort-moe-library", str(args.ort_moe_library)], ("ort",)))
    outs = {suffix: cdir / f"out{suffix.replace(' ', '-')}" for suffix, *_ in variants}
    print(f"\n[{name}] H {c.hidden_size} I {c.intermediate_size} L {c.num_hidden_layers} E {c.num_local_experts} "
          f"k {c.num_experts_per_tok} V {c.vocab_size} {c.dtype}", flush=True)
    for suffix, quant, extra, targets in variants:
        folder = outs[suffix]
        t = time.perf_counter()
        subprocess.run([str(exe), "build", str(ckpt), "-o", str(folder), "--target", ",".join(targets), "--no-validate",
                        *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        entries = json.loads((folder / "manifest.json").read_text())["targets"]
        sizes = ", ".join(f"{target} {sum(f['bytes'] for f in e['files']) / 1e6:.1f} MB" for target, e in entries.items())
        print(f"[{name}] mixexport build{suffix or ' (fp32, full precision experts)'} {' '.join(extra)}: "
              f"{time.perf_counter() - t:.0f} s; {sizes}", flush=True)
    kv = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)

    runners: dict[str, object] = {}
    failures: dict[str, str] = {}

    def add(label, factory):
        try:
            runners[label] = factory()
        except Skipped as exc:
            failures[label] = f"skipped: {exc}"
        except Exception as exc:  # noqa: BLE001 - report and go on
            line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            failures[label] = f"FAILED: {line[:300]}"
            if args.verbose:
                traceback.print_exc()

    add("hf eager", lambda: HFRunner(ckpt))
    add("reference", lambda: RefRunner(ckpt))
    if not args.skip_hf_onnx:
        def hf_onnx():
            path = cdir / "hf_plain" / "model.onnx"
            path.parent.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            export_hf_plain(ckpt, path)
            print(f"[{name}] plain torch.onnx export of transformers' Mixtral: {time.perf_counter() - t0:.0f} s",
                  flush=True)
            return OrtRunner(path, *kv)
        add("hf onnx (ort)", hf_onnx)
    labels = ["reference", "hf eager", "hf onnx (ort)"]
    schemes = {}
    for suffix, quant, _, targets in variants:
        for target in targets:
            label = f"ours {target}{suffix}"
            labels.append(label)
            schemes[label] = quant
            layout = "shared" if suffix == " shared" else "concat"
            library = args.ort_moe_library if suffix == " op" else None
            add(label, lambda target=target, folder=outs[suffix], layout=layout, library=library: OrtRunner(
                folder / target / "model.onnx", *kv, kv_layout=layout, buffer_length=args.prompt + WARMUP + args.steps + 1,
                library=library))
    peers = add_peer_rows(add, name, c, ckpt, cdir, outs[""] / "ort", args, runners)
    labels += peers
    if args.ort_moe_library:  # genai loads the library its genai_config.json names
        add("ours ort op (genai)", lambda: GenaiRunner(outs[" op"] / "ort"))
        labels.append("ours ort op (genai)")
    if "reference" in runners:
        forced = greedy_tokens(runners["reference"], args.prompt, args.steps, c.vocab_size)
        print(f"[{name}] top-1 agreement with the reference over {args.steps} teacher-forced decode steps, batch 1:")
        for label, runner in runners.items():
            if label.startswith("ours") or label in peers:
                picked = greedy_tokens(runner, args.prompt, args.steps, c.vocab_size, forced[:-1])
                agree = [int(a == b) for a, b in zip(picked[1:], forced[1:])]
                first = f" (first {TARGET_STEPS}: {sum(agree[:TARGET_STEPS])}/{TARGET_STEPS})" if args.steps > TARGET_STEPS else ""
                print(f"    {label:<24} {sum(agree)}/{args.steps}{first}")

    cache = cpu_caches()
    for batch in args.batches:
        results = time_rows(runners, batch, args, c.vocab_size)
        bandwidths = [bandwidth]
        for _ in range(args.rounds - 1):
            bandwidths.append(dram_bandwidth())
            results = best_of(results, time_rows(runners, batch, args, c.vocab_size))
        bw = max(bandwidths)
        limit_ms = dram_bytes(active_bytes(c, batch), cache) / bw * 1e3
        limits = {label: dram_bytes(active_bytes(c, batch, quant), cache) / bw * 1e3 for label, quant in schemes.items()}
        limits.update({label: dram_bytes(gguf_active_bytes(runner.path, c, batch), cache) / bw * 1e3
                       for label, runner in runners.items() if isinstance(runner, LlamaCppRunner)})
        if args.results_json:
            record_results(args.results_json, f"{name}, batch {batch}", results, limit_ms)
        base = results.get("hf eager")
        rounds = f", best of {args.rounds} rounds" if args.rounds > 1 else ""
        print(f"\n== {name}, batch {batch}, prompt {args.prompt}, {args.steps} decode steps{rounds}; "
              f"bandwidth limit {limit_ms:.2f} ms/step ({active_bytes(c, batch) / 1e6:.0f} MB active weights less "
              f"{cache / 2**20:.1f} MiB of CPU caches, at {bw / 1e9:.1f} GB/s, the best of {len(bandwidths)} measurements) ==")
        print(f"{'implementation':<24} {'prefill ms':>10} {'decode ms/tok':>13} {'prefill x hf':>12} "
              f"{'decode x hf':>11} {'x limit':>8} {'x ours ort':>10}")
        ours = results.get("ours ort")
        for label in labels:
            r = results.get(label)
            if r is None:
                if label in failures:
                    print(f"{label:<24} {failures[label]}")
                continue
            if isinstance(r, str):
                print(f"{label:<24} {r}")
                continue
            pre, dec = r
            if isinstance(base, tuple):
                xp, xd = f"{pre / base[0]:.2f}", f"{dec / base[1]:.2f}"
            else:
                xp = xd = "n/a"
            speedup = f"{ours[1] / dec:.2f}" if isinstance(ours, tuple) else "n/a"  # > 1: faster than fp ort
            print(f"{label:<24} {pre:>10.1f} {dec:>13.2f} {xp:>12} {xd:>11} {dec / limits.get(label, limit_ms):>8.2f} "
                  f"{speedup:>10}")
        sys.stdout.flush()
    for label, line in failures.items():
        print(f"[{name}] {label}: {line}")


def record_results(path: Path, key: str, results: dict, limit_ms: float) -> None:
    """Add one table's decode medians (ms; rows that did not time are left out) to the JSON file
    `path`, under `key`."""
    done = json.loads(path.read_text()) if path.exists() else {}
    done[key] = {"limit_ms": limit_ms, "decode_ms": {label: r[1] for label, r in results.items() if isinstance(r, tuple)}}
    path.write_text(json.dumps(done))


def across_processes(argv: list[str], processes: int) -> int:
    """Run this benchmark `processes` times, each in a process of its own, then print every row's
    decode ms over them and its ratio to ours ort and to llama.cpp f32 in each. (On these VMs the
    spread between processes is larger than within one: a process's rows land on different
    physical memory; one run put ours ort level with llama.cpp f32 between two with a 20% gap.)"""
    runs = []
    with tempfile.TemporaryDirectory(prefix="mixexport-decode-runs-") as tmp:
        for i in range(processes):
            print(f"\n#### process {i + 1} of {processes}", flush=True)
            out = Path(tmp) / f"run{i}.json"
            done = subprocess.run([sys.executable, __file__, *argv, "--processes", "1", "--results-json", str(out)])
            if done.returncode != 0:
                print(f"process {i + 1} failed (exit {done.returncode})")
                return done.returncode
            runs.append(json.loads(out.read_text()) if out.exists() else {})
    print(f"\n==== decode ms/token over {processes} processes: median [min, max]; x ours ort and x llama.cpp f32 "
          f"per process (> 1: slower) ====")
    for key in runs[0]:
        tables = [run[key] for run in runs if key in run]
        print(f"\n== {key}; bandwidth limit {statistics.median(t['limit_ms'] for t in tables):.2f} ms/step (median) ==")
        for label in tables[0]["decode_ms"]:
            times = [t["decode_ms"].get(label) for t in tables]
            if None in times:
                continue
            line = f"{label:<24} {statistics.median(times):7.2f} [{min(times):.2f}, {max(times):.2f}]"
            for base in ("ours ort", "llama.cpp f32"):
                if all(base in t["decode_ms"] for t in tables) and label != base:
                    ratios = " ".join(f"{x / t['decode_ms'][base]:.2f}" for x, t in zip(times, tables))
                    line += f"   x {base}: {ratios}"
            print(line)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["small", "mid"], choices=["small", "mid"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-hf-onnx", action="store_true", help="skip the plain transformers export row")
    ap.add_argument("--quant", nargs="*", default=["int8", "int4"], choices=["int8", "int4"],
                    help="also build and time artifacts with these --experts-quant schemes (int4: group 32)")
    ap.add_argument("--dtypes", nargs="*", default=["float16"], choices=["float16"],
                    help="also build and time float16 artifacts (the float32 ones are always built)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every row this many times, row after row, and keep each row's best (a loaded machine)")
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="a llama.cpp source tree (its convert_hf_to_gguf.py makes the GGUF of the llama.cpp rows)")
    ap.add_argument("--ort-moe-library", type=Path, default=None, metavar="LIB",
                    help="also build and time the ort graph whose MoE runs in this op library (plugins/ort_moe): "
                         "row 'ours ort op'")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the whole benchmark this many times, each in its own process, and summarize them")
    ap.add_argument("--results-json", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    args = ap.parse_args()
    if args.processes < 1:
        ap.error("--processes must be at least 1")
    if args.processes > 1:
        argv, rest = [], iter(sys.argv[1:])
        for arg in rest:  # the children run one process each
            if arg == "--processes":
                next(rest, None)
            elif not arg.startswith("--processes="):
                argv.append(arg)
        return across_processes(argv, args.processes)

    torch.set_num_threads(THREADS)
    print(machine_info())
    bw = dram_bandwidth()
    print(f"DRAM read bandwidth (torch sum over 2 GiB, 1 and {THREADS} threads, best of 5): {bw / 1e9:.2f} GB/s",
          flush=True)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mixexport-decode-", dir=args.workdir))
    try:
        for name in args.configs:
            run_config(name, args, work, bw)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
