"""Trace the reference decoder into ONNX, without its weights in memory.

The decoder is built on the meta device and traced with meta inputs by
`torch.onnx.export(dynamo=True)`; its initializers come out data-less and are filled afterwards
by `attach_checkpoint_weights`, which gives each one a lazy tensor streamed from the checkpoint
when the model is saved. Capture therefore costs the same memory for Mixtral 8x22B as for a toy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx_ir as ir
import torch

from mixexport import graph_io
from mixexport.capture.moe_op import TRANSLATION_TABLE
from mixexport.checkpoint.config import MixtralConfig
from mixexport.dtypes import torch_dtype
from mixexport.capture.lazy_weights import StackedLazyTensor, to_numpy
from mixexport.errors import InternalError, MixexportError
from mixexport.model.decoder import MixtralDecoder, expert_sources, parameter_sources

# Opset 18: the torch.onnx exporter's native opset (no version conversion after translation) and
# one every TensorRT 10 ONNX parser and onnxruntime >= 1.14 accept. Nothing in the decoder needs a
# newer standard op: attention, RoPE and norms are lowered to basic ops or to contrib ops by passes.
OPSET = 18


class _CaptureDecoder(MixtralDecoder):
    """The decoder with the graph contract's flat signature: (ids, mask, positions, *past) ->
    (logits, *present), past and present ordered (key, value) per layer."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = super().forward(input_ids, attention_mask, position_ids, pairs)
        return (logits, *[t for kv in present for t in kv])


def capture_decoder(config: MixtralConfig, dtype: str, max_batch: int = 64, max_sequence: int = 4096,
                    max_total: int | None = None) -> ir.Model:
    """Export the decoder to an ONNX IR model whose initializers have no data yet.

    Args:
        config: model shapes.
        dtype: weights and KV-cache dtype.
        max_batch, max_sequence, max_total: upper bounds of the dynamic dimensions (batch, new
            tokens, past + new tokens), any value >= 1; torch.export checks the trace against them
            (widened to hold its example sizes). The graph's dimensions stay symbolic.

    Returns:
        the captured model: one `mixexport.MoE` node per layer, I/O named per `graph_io`.
    """
    max_total = max_total or max(max_sequence, config.max_position_embeddings)
    with torch.device("meta"):
        model = _CaptureDecoder(config, moe_impl=torch.ops.mixexport.moe).to(torch_dtype(dtype)).eval()
    # Example sizes are distinct and > 1 so torch.export does not specialise any of them.
    b, s, p = 2, 3, 5
    # The Dims' bounds only limit what torch.export checks while tracing: the graph's dimensions stay
    # symbolic whatever they are (the manifest records the user's ranges). So each bound is widened
    # to hold the example sizes, which makes every range from 1 up valid (--max-batch 1 included).
    batch = torch.export.Dim(graph_io.BATCH, min=1, max=max(max_batch, b + 1))
    seq = torch.export.Dim(graph_io.SEQUENCE, min=1, max=max(max_sequence, s + 1))
    # A past of max_total leaves no room for a new token; a max of max_total fails torch.export's
    # first attempt (guard past <= max_total - 1) and costs a second full trace.
    past = torch.export.Dim(graph_io.PAST, min=0, max=max(max_total - 1, p + 1))
    # Dim + Dim is refused, so the mask's length has its own Dim rather than past + sequence.
    total = torch.export.Dim(graph_io.TOTAL, min=1, max=max(max_total, p + s + 1))

    ids = torch.zeros(b, s, dtype=torch.int64, device="meta")
    mask = torch.zeros(b, p + s, dtype=torch.int64, device="meta")
    kv_shape = (b, config.num_key_value_heads, p, config.head_dim)
    past_kv = tuple(torch.zeros(kv_shape, dtype=torch_dtype(dtype), device="meta")
                    for _ in range(2 * config.num_hidden_layers))
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                      tuple({0: batch, 2: past} for _ in past_kv))
    input_names = [b.name for b in graph_io.inputs(config, dtype)]
    output_names = [b.name for b in graph_io.outputs(config, dtype)]

    log = io.StringIO()
    # The exporter warns about every torchvision op it cannot register; none matter here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (ids, mask, ids.clone(), *past_kv), dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=input_names, output_names=output_names, opset_version=OPSET,
                custom_translation_table=TRANSLATION_TABLE, optimize=False, verbose=False)
    except Exception as exc:  # the exporter raises many types; all mean the same thing here
        raise MixexportError(f"capture failed: torch.onnx.export could not trace the decoder ({exc})") from exc
    onnx_model = program.model
    onnx_model.producer_name = "mixexport"
    return onnx_model


def attach_checkpoint_weights(model: ir.Model, checkpoint, dtype: str) -> int:
    """Give every initializer a lazy tensor read from `checkpoint` when the model is saved.

    Expert stacks get a `StackedLazyTensor`, streamed one expert at a time; their slices stay in
    the checkpoint's dtype until written (see `materialize`).

    Args:
        model: a captured model (initializers named as the reference model's parameters).
        checkpoint: a `mixexport.checkpoint.Checkpoint`.
        dtype: the dtype the captured graph expects.

    Returns:
        the number of initializers attached.
    """
    sources = parameter_sources(checkpoint.config)
    stacked = expert_sources(checkpoint.config)
    unknown = sorted(set(sources) - set(model.graph.initializers))
    if unknown:
        raise InternalError(f"captured graph lacks initializers for parameters {unknown[:5]}")
    for name, value in model.graph.initializers.items():
        if name in stacked:
            count, part = stacked[name]
            value.const_value = StackedLazyTensor(
                lambda e, part=part: to_numpy(part(checkpoint, None, e)), count, value.dtype, value.shape, name)
        elif name in sources:
            value.const_value = ir.LazyTensor(
                lambda source=sources[name]: ir.tensor(to_numpy(source(checkpoint, dtype))),
                dtype=value.dtype, shape=value.shape, name=name)
    return len(sources)
