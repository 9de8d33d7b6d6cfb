"""The PyTorch reference as a Polygraphy runner.

Polygraphy's own `PytRunner` hard-codes CUDA, so this small `BaseRunner` runs the reference
decoder on CPU. Besides the graph contract's outputs it returns each layer's router logits
(`layers.{i}.moe.router_logits`), recorded as the MoE op is called, for router agreement.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from mixexport import graph_io
from mixexport.dtypes import canonical_dtype
from mixexport.model.moe import moe_reference_batches
from mixexport.graph_io import router_logits_name
from mixexport.quant import QuantScheme
from mixexport.validate.quant_parity import dequantized_experts


class RecordingMoE:
    """The MoE reference, remembering the router logits of every call (one call per layer).

    `quant` (settable between runs): compute with the dequantized experts of that scheme, the
    reference of a quantized artifact's exactness check (`quant_parity`); None: as stored.
    """

    def __init__(self) -> None:
        self.router_logits: list[torch.Tensor] = []
        self.quant: QuantScheme | None = None

    def __call__(self, x, router_logits, w_gate_up, w_down, top_k, normalize):
        (out,) = self.batches([(x, router_logits)], w_gate_up, w_down, top_k, normalize)
        return out

    def batches(self, routed, w_gate_up, w_down, top_k, normalize):
        """The op on several (x, router_logits) batches at once (`moe_reference_batches`)."""
        self.router_logits += [router_logits.detach() for _, router_logits in routed]
        experts = (dequantized_experts(w_gate_up, w_down, self.quant) if self.quant is not None
                   else lambda e: (w_gate_up[e], w_down[e]))
        return moe_reference_batches(routed, experts, w_gate_up.shape[0], top_k, normalize)


class TorchReferenceRunner(BaseRunner):
    """Runs `MixtralDecoder` on feed dicts named per the graph contract.

    Args:
        model: a reference decoder built with a `RecordingMoE` as its MoE implementation.
        recorder: that `RecordingMoE`.
    """

    def __init__(self, model, recorder: RecordingMoE, name: str = "reference") -> None:
        super().__init__(name=name, prefix="pytorch-reference")
        self.model, self.recorder = model, recorder

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        config = self.model.config
        for binding in graph_io.inputs(config, canonical_dtype(self.model.embed_tokens.weight.dtype)):
            dtype = np.int64 if binding.dtype == "int64" else np.float32
            meta.add(binding.name, dtype, [d if isinstance(d, int) else -1 for d in binding.shape])
        return meta

    def infer_impl(self, feed_dict):
        config = self.model.config
        dtype = self.model.embed_tokens.weight.dtype
        past = [(torch.from_numpy(feed_dict[k]).to(dtype), torch.from_numpy(feed_dict[v]).to(dtype))
                for k, v in (graph_io.past_names(i) for i in range(config.num_hidden_layers))]
        self.recorder.router_logits.clear()
        start = time.perf_counter()
        with torch.no_grad():
            logits, present = self.model(torch.from_numpy(feed_dict["input_ids"]),
                                         torch.from_numpy(feed_dict["attention_mask"]),
                                         torch.from_numpy(feed_dict["position_ids"]), past)
        self.inference_time = time.perf_counter() - start
        outputs = OrderedDict(logits=logits.numpy())
        for i, (key, value) in enumerate(present):
            k_name, v_name = graph_io.present_names(i)
            outputs[k_name], outputs[v_name] = _numpy(key), _numpy(value)
        for i, logits_i in enumerate(self.recorder.router_logits):
            outputs[router_logits_name(i)] = _numpy(logits_i)
        return outputs


def _numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: compare bf16 tensors as float32 (exactly representable).
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
