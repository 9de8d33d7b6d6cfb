"""capture: one `mixexport.MoE` node per layer, the graph_io contract, weights attached lazily."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from artifact.shared import captured_once
from mixexport import graph_io
from mixexport.capture.moe_op import MOE_DOMAIN, MOE_INPUTS, MOE_OP
from mixexport.model.decoder import parameter_sources

IR_DTYPES = {"int64": ir.DataType.INT64, "float32": ir.DataType.FLOAT}


def test_one_moe_node_per_layer(tiny_checkpoint):
    model, ckpt = captured_once(tiny_checkpoint)
    c = ckpt.config
    moe = [n for n in model.graph if n.domain == MOE_DOMAIN]
    assert len(moe) == c.num_hidden_layers
    assert {n.op_type for n in moe} == {MOE_OP}
    assert model.opset_imports[MOE_DOMAIN] == 1
    assert onnx.defs.has(MOE_OP, MOE_DOMAIN)
    for layer, node in enumerate(moe):
        assert len(node.inputs) == len(MOE_INPUTS)
        assert {k: a.value for k, a in node.attributes.items()} == {"top_k": c.num_experts_per_tok, "normalize": 1}
        w_gate_up, w_down = node.inputs[2], node.inputs[3]
        assert w_gate_up.name == f"layers.{layer}.moe.w_gate_up" and w_gate_up.is_initializer()
        assert w_down.name == f"layers.{layer}.moe.w_down" and w_down.is_initializer()
        e, i, h = c.num_local_experts, c.intermediate_size, c.hidden_size
        assert tuple(w_gate_up.shape) == (e, 2 * i, h) and tuple(w_down.shape) == (e, h, i)
        assert tuple(node.inputs[1].shape)[-1] == e


def test_io_follows_graph_io(tiny_checkpoint):
    model, ckpt = captured_once(tiny_checkpoint)
    c = ckpt.config
    dtype = c.dtype
    inputs, outputs = graph_io.inputs(c, dtype), graph_io.outputs(c, dtype)
    assert [v.name for v in model.graph.inputs] == [b.name for b in inputs]
    assert [v.name for v in model.graph.outputs] == [b.name for b in outputs]
    for value, binding in zip([*model.graph.inputs, *model.graph.outputs], [*inputs, *outputs]):
        assert value.dtype == IR_DTYPES[binding.dtype], binding.name
    for value, binding in zip(model.graph.inputs, inputs):  # capture's inputs already carry the contract dims
        assert [d.value if isinstance(d, ir.SymbolicDim) else d for d in value.shape] == list(binding.shape)


def test_every_parameter_gets_a_lazy_checkpoint_tensor(tiny_checkpoint):
    model, ckpt = captured_once(tiny_checkpoint)
    sources = parameter_sources(ckpt.config)
    inits = model.graph.initializers
    assert set(sources) <= set(inits)
    for name in sources:
        assert isinstance(inits[name].const_value, ir.LazyTensor), name
    got = inits["layers.1.moe.w_down"].const_value.numpy()
    want = ckpt.down(1, ckpt.config.dtype).numpy()
    assert (got == want).all()


def _node_signature(model: ir.Model) -> list:
    return [(n.op_type, n.domain, sorted((k, str(a.value)) for k, a in n.attributes.items())) for n in model.graph]


def test_ranges_down_to_one_capture_the_same_graph(tiny_checkpoint):
    """The trace bounds are widened to hold the example sizes, so ranges of 1 (`--max-batch 1`,
    `--max-sequence 1`, a context of 1) trace, and into the very graph that the default ranges give."""
    from mixexport.capture.export import capture_decoder

    model, ckpt = captured_once(tiny_checkpoint)
    for bounds in [(1, 1, 1), (1, 1, 2), (8, 2048, 8192)]:
        other = capture_decoder(ckpt.config, ckpt.config.dtype, *bounds)
        assert _node_signature(other) == _node_signature(model), bounds
