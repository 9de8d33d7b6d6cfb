"""Cut a target's lowered graph into stage graphs at decoder-layer boundaries.

A stage (`graph_io.Stage`) is the embedding, a contiguous range of layers, or the final norm +
lm_head (or any contiguous union of them). Its inputs are its boundary, declared by
`graph_io.Stage.inputs`: the residual stream `hidden_states.{first}` (or `input_ids`), the mask, the
positions and its layers' past; its outputs are the next boundary and its layers' present (and,
for validation, its layers' router logits). The cut is the backward slice of the whole graph
from those outputs to those inputs, so chained stages compute exactly what the whole graph does.

The cut fails, naming the tensor, when the slice reaches anything else: a graph input the stage
does not declare, or a weight of another stage (a computation that crosses a boundary). It never
adds an input to make a stage work. Small shared constants (RoPE table ends, axes) are copied
into every stage that uses them; per-layer work the whole graph shares across layers (RoPE
cos/sin from `position_ids`) is recomputed by each stage.

The whole graph's `attention_mask` check (`check_attention_mask`, which reads `input_ids` and the
layer-0 past) stays in a stage that holds both (the embedding with layer 0); other stages take the
checked mask as their `attention_mask` input, so they do not check the mask's shape themselves.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from mixexport import graph_io
from mixexport.checkpoint.config import MixtralConfig
from mixexport.errors import InternalError, MixexportError
from mixexport.passes.check_attention_mask import CHECKED_MASK, MASK

_LAYER_WEIGHT = re.compile(r"layers\.(\d+)\.")
# Top-level parameter name prefixes (the reference model's, which initializers keep) -> owner.
_EMBEDDING_WEIGHTS = ("embed_tokens.",)
_HEAD_WEIGHTS = ("norm.", "lm_head.")


def layer_stages(num_layers: int, layers_per_stage: int = 1) -> list[graph_io.Stage]:
    """The embedding, layers in ranges of `layers_per_stage` (the last may be shorter), the head.

    Args:
        num_layers: decoder layers of the graph.
        layers_per_stage: layers per middle stage, >= 1.

    Returns:
        the stages in chain order.
    """
    if layers_per_stage < 1:
        raise InternalError(f"layers_per_stage must be >= 1, got {layers_per_stage}")
    middle = [graph_io.Stage(first, min(first + layers_per_stage, num_layers))
              for first in range(0, num_layers, layers_per_stage)]
    return [graph_io.Stage(0, 0, embedding=True), *middle, graph_io.Stage(num_layers, num_layers, head=True)]


def weight_owner(name: str) -> str | int | None:
    """Which part of the decoder an initializer belongs to: a layer index, "embedding", "head",
    or None for a shared constant (no parameter's name). Stage artifacts balance their stages by
    the bytes of each owner (`artifact.stages`)."""
    layer = _LAYER_WEIGHT.match(name)
    if layer:
        return int(layer.group(1))
    if name.startswith(_EMBEDDING_WEIGHTS):
        return "embedding"
    if name.startswith(_HEAD_WEIGHTS):
        return "head"
    return None


def _owned_by(stage: graph_io.Stage, owner: str | int | None) -> bool:
    if owner is None:
        return True
    if owner == "embedding":
        return stage.embedding
    if owner == "head":
        return stage.head
    return stage.first <= owner < stage.end


def _boundary_source(stage: graph_io.Stage, name: str, values: dict[str, ir.Value]) -> ir.Value:
    """The value of the whole graph a stage input named `name` stands for."""
    holds_check = stage.embedding and stage.first == 0  # it has input_ids and the layer-0 past
    if name == MASK and CHECKED_MASK in values and not holds_check:
        return values[CHECKED_MASK]
    if name not in values:
        raise InternalError(f"the graph has no value {name!r} to cut a stage at (was it named by name_graph?)")
    return values[name]


def cut_stage(model: ir.Model, stage: graph_io.Stage, config: MixtralConfig, dtype: str,
              router_logits: bool = False) -> ir.Model:
    """One stage of a lowered (or captured) decoder graph, as a new model; `model` is unchanged.

    The stage model shares the whole model's tensors (lazy ones stay lazy), so cutting costs no
    weight memory; it holds only the initializers its nodes read.

    Args:
        model: a whole decoder graph, named by `name_graph` (every target's lowered graph is).
        stage: the part to cut out.
        config, dtype: the model's shapes and graph dtype (for the boundary's bindings).
        router_logits: also output its layers' router logits (validation compares them).

    Returns:
        the stage model: inputs and outputs as `stage.inputs` / `stage.outputs` declare.

    Raises:
        MixexportError: when the stage needs a tensor outside its boundary (named in the message).
    """
    stage_model = model.clone()
    graph = stage_model.graph
    values = {v.name: v for v in graph.inputs}
    values.update({out.name: out for node in graph for out in node.outputs})
    new_inputs = []
    for binding in stage.inputs(config, dtype):
        source = _boundary_source(stage, binding.name, values)
        if source in graph.inputs and source.name == binding.name:
            new_inputs.append(source)
            continue
        # An inner value becomes an input: its users read the new input, its producer goes dead.
        # Its shape is the contract's (the checked mask has none: it is what the check checks).
        value = ir.Value(name=binding.name, type=source.type, shape=ir.Shape(binding.shape))
        source.replace_all_uses_with(value)
        if source.name == binding.name:
            source.name = f"{binding.name}/replaced_by_stage_input"
        new_inputs.append(value)
    _reread_shapes(graph, dict(zip(new_inputs, stage.inputs(config, dtype))),
                   {b.name: b for b in graph_io.inputs(config, dtype)})
    new_outputs = []
    for binding in stage.outputs(config, dtype, router_logits):
        if binding.name not in values:
            raise InternalError(f"the graph has no value {binding.name!r} for stage {stage.name}'s output")
        new_outputs.append(values[binding.name])
    graph.inputs.clear()
    graph.inputs.extend(new_inputs)
    graph.outputs.clear()
    graph.outputs.extend(new_outputs)
    _keep_only_what_outputs_need(graph)
    _check_closed(graph, stage)
    return stage_model


def cut_stages(model: ir.Model, stages: list[graph_io.Stage], config: MixtralConfig, dtype: str,
               router_logits: bool = False) -> list[ir.Model]:
    """`cut_stage` for each of `stages` (e.g. `layer_stages(L)`), in order."""
    return [cut_stage(model, stage, config, dtype, router_logits) for stage in stages]


def _reread_shapes(graph: ir.Graph, declared: dict[ir.Value, graph_io.Binding],
                   contract: dict[str, graph_io.Binding]) -> None:
    """Point each one-dimension `Shape` read of an undeclared graph input at a declared input with
    the same named dimension.

    The exporter takes a symbolic size from whichever input first had it (the sequence length from
    `input_ids`, the batch from the last layer's past), so every layer reads those inputs' shapes.
    The contract names the dimensions (`graph_io`): `Shape(past_key_values.31.value)[0]` is
    `batch`, which a stage's own `hidden_states` has too. Any other read of an undeclared input is
    left for `_check_closed` to refuse.
    """
    for node in list(graph):
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.inputs[0] in declared:
            continue
        binding = contract.get(node.inputs[0].name)
        if binding is None or node.inputs[0] not in graph.inputs:
            continue
        rank = len(binding.shape)
        start = _axis(node, "start", 0, rank)
        end = _axis(node, "end", rank, rank)
        if end - start != 1 or not isinstance(binding.shape[start], str):
            continue
        dim = binding.shape[start]
        source = next(((value, b.shape.index(dim)) for value, b in declared.items() if dim in b.shape), None)
        if source is None:
            continue
        value, axis = source
        node.replace_input_with(0, value)
        node.attributes["start"] = ir.AttrInt64("start", axis)
        node.attributes["end"] = ir.AttrInt64("end", axis + 1)


def _axis(node: ir.Node, name: str, default: int, rank: int) -> int:
    """A Shape node's start/end attribute, negative values counted from the end, clamped."""
    attr = node.attributes.get(name)
    value = default if attr is None else attr.as_int()
    return min(max(value + rank if value < 0 else value, 0), rank)


def _reads(node: ir.Node) -> list[ir.Value]:
    """The values a node reads, those its subgraphs (If branches) read from outside included."""
    reads = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for sub in subgraphs:
            reads += [v for inner in ir.traversal.RecursiveGraphIterator(sub) for v in inner.inputs if v is not None]
    return reads


def _keep_only_what_outputs_need(graph: ir.Graph) -> None:
    """Remove every node and initializer the graph's outputs do not depend on.

    Not onnx-ir's RemoveUnusedNodesPass: a removed If node's branches still count as users of the
    outer values they read, so that pass keeps their producers (the whole MoE of every layer).
    """
    live: set[ir.Node] = set()
    stack = [v.producer() for v in graph.outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack += [v.producer() for v in _reads(node) if v.producer() is not None and v.producer() not in live]
    for node in reversed(list(graph)):
        if node not in live:
            graph.remove(node, safe=False)
    read = {v.name for node in graph for v in _reads(node)} | {v.name for v in graph.outputs}
    for name in [n for n in graph.initializers if n not in read]:
        del graph.initializers[name]


def _check_closed(graph: ir.Graph, stage: graph_io.Stage) -> None:
    """Every value the stage's nodes read is computed in the stage, is one of its inputs, or is
    one of its own initializers."""
    free = set(graph.inputs)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                free.update(attr.value.inputs)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    free.update(sub.inputs)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.inputs:
            if value is None or value.producer() is not None or value in free:
                continue
            if value.is_initializer() and value.name in graph.initializers:
                if not _owned_by(stage, weight_owner(value.name)):
                    raise MixexportError(f"stage {stage.name} reads weight {value.name}, which belongs to another "
                                         f"stage: the graph computes across the stage boundary")
                continue
            raise MixexportError(f"stage {stage.name} needs tensor {value.name}, which is not one of its boundary "
                                 f"inputs ({', '.join(v.name for v in graph.inputs)}): the graph computes across "
                                 f"the stage boundary")
