"""Parity of a graph with the shared-buffer KV layout (`graph_io.KV_LAYOUTS`, `targets.ort.fuse_gqa`)
on the same scenario as every other graph.

The scenario's feeds are in the concat layout: a left-padded row, past [B, KVH, P, D]. A shared
graph cannot take left padding (its rows are packed at the front of static buffers), so
`SharedBufferRunner` feeds it what the same tokens are in its own contract:

    row b's real past keys -> buffer slots [0, p_b), zeros after, buffer [B, KVH, T + SLACK, D]
    row b's real new tokens -> the front of input_ids / position_ids, padding after
    attention_mask [B, T]: n_b ones (past + new real tokens), zeros after

and maps its outputs back to the concat layout: the logits and router logits of each real new
token to that token's position, each row's valid buffer prefix (slots [0, n_b)) to its real key
positions. Padding positions are not part of the shared contract (GroupQueryAttention computes
whatever it computes there, and nothing reads it), so they are zero on both sides:
`zero_padding` does the same to the reference's outputs. Everything a real token computes or
stores is compared, at the same tolerances as every other graph.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from mixexport import graph_io
from mixexport.errors import InternalError

# Buffer slots beyond the tokens so far: the graph must not read or need them.
SLACK = 3


def graph_kv_layout(model: onnx.ModelProto) -> str:
    """The KV layout of a decoder graph, read from its first past input's length dimension."""
    past = next((v for v in model.graph.input if v.name == graph_io.past_names(0)[0]), None)
    dims = past.type.tensor_type.shape.dim if past is not None else []
    return "shared" if len(dims) == 4 and dims[2].dim_param == graph_io.KV_BUFFER else "concat"


def _layout(feed: dict[str, np.ndarray]) -> tuple[np.ndarray, int, int]:
    """(the mask as bool [B, T], P, S) of a concat-layout feed."""
    mask = feed["attention_mask"].astype(bool)
    seq = feed["input_ids"].shape[1]
    return mask, mask.shape[1] - seq, seq


def shared_feed(feed: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """The shared layout's feed of the tokens a concat-layout feed holds (module docstring)."""
    mask, past_len, seq = _layout(feed)
    batch, total = mask.shape
    ids = np.zeros_like(feed["input_ids"])
    positions = np.zeros_like(feed["position_ids"])
    counts = mask.sum(-1)
    for b in range(batch):
        new = mask[b, past_len:]
        ids[b, :new.sum()] = feed["input_ids"][b, new]
        positions[b, :new.sum()] = feed["position_ids"][b, new]
    out = {"input_ids": ids, "position_ids": positions,
           "attention_mask": (np.arange(total)[None] < counts[:, None]).astype(np.int64)}
    for layer in range(num_layers):
        for name in graph_io.past_names(layer):
            past = feed[name]
            buffer = np.zeros((*past.shape[:2], total + SLACK, past.shape[3]), past.dtype)
            for b in range(batch):
                real = mask[b, :past_len]
                buffer[b][:, :real.sum()] = past[b][:, real]  # per row: one advanced index
            out[name] = buffer
    return out


def concat_outputs(outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> OrderedDict:
    """A shared graph's outputs for `shared_feed(feed)` in the concat layout of `feed`, zero at
    padding positions (logits [B, S, V], present [B, KVH, T, D], router logits [B*S, E])."""
    mask, past_len, seq = _layout(feed)
    batch, total = mask.shape
    result = OrderedDict()
    for name, value in outputs.items():
        group = _group(name)
        if group == "logits":
            mapped = np.zeros_like(value)
            for b in range(batch):
                new = mask[b, past_len:]
                mapped[b, new] = value[b, :new.sum()]
        elif group == "present":
            mapped = np.zeros((*value.shape[:2], total, value.shape[3]), value.dtype)
            for b in range(batch):
                mapped[b][:, mask[b]] = value[b][:, :mask[b].sum()]
        elif group == "router_logits":
            rows = value.reshape(batch, seq, -1)
            mapped = np.zeros_like(rows)
            for b in range(batch):
                new = mask[b, past_len:]
                mapped[b, new] = rows[b, :new.sum()]
            mapped = mapped.reshape(value.shape)
        else:
            raise InternalError(f"no shared-layout mapping for output {name}")
        result[name] = mapped
    return result


def zero_padding(outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> OrderedDict:
    """Concat-layout outputs for `feed` with every padding position zeroed (what
    `concat_outputs` gives a shared graph's), the real ones unchanged."""
    mask, past_len, seq = _layout(feed)
    new = mask[:, past_len:]
    result = OrderedDict()
    for name, value in outputs.items():
        value = np.array(value, copy=True)
        group = _group(name)
        if group == "logits":
            value[~new] = 0
        elif group == "present":
            value.transpose(0, 2, 1, 3)[~mask] = 0
        elif group == "router_logits":
            value.reshape(*new.shape, -1)[~new] = 0
        else:
            raise InternalError(f"no shared-layout mapping for output {name}")
        result[name] = value
    return result


def _group(name: str) -> str:
    if name == "logits":
        return name
    if name.startswith("present."):
        return "present"
    return "router_logits" if name.endswith("router_logits") else name


class SharedBufferRunner(BaseRunner):
    """Runs a shared-layout graph (through `inner`, a runner of it) on concat-layout feeds and
    returns its outputs in the concat layout, padding zeroed (module docstring)."""

    def __init__(self, inner: BaseRunner, num_layers: int) -> None:
        super().__init__(name=inner.name, prefix="shared-kv")
        self.inner, self.num_layers = inner, num_layers

    def activate_impl(self):
        self.inner.activate()

    def deactivate_impl(self):
        self.inner.deactivate()

    def get_input_metadata_impl(self):
        # The graph's names and dtypes; every dimension dynamic, since the feeds are concat-layout.
        meta = TensorMetadata()
        for name, (dtype, shape) in self.inner.get_input_metadata().items():
            meta.add(name, dtype, [-1] * len(shape))
        return meta

    def infer_impl(self, feed_dict):
        outputs = self.inner.infer(shared_feed(feed_dict, self.num_layers), check_inputs=False)
        self.inference_time = self.inner.last_inference_time()
        return concat_outputs(outputs, feed_dict)
