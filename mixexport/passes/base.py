"""What every mixexport pass shares: a result that counts rewrites, and lazy derived initializers."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mixexport.capture import StackedLazyTensor, materialize
from mixexport.errors import InternalError


@dataclasses.dataclass
class RewriteResult(ir.passes.PassResult):
    """A pass result that also says how many rewrites the pass made."""

    rewrites: int = 0


class AllOrNothingFusion(ir.passes.InPlacePass):
    """A fusion that rewrites every one of its `expected` sites, or none.

    Subclasses set `sites` (what `expected` counts, for messages) and give `match(model)`, one
    match or reason string per site, and `rewrite(model, matches)`. When any site declines nothing
    is rewritten, `rewrites` is 0 and `reason` is the first reason; the pipeline turns a shortfall
    against `expected` into an error.
    """

    sites = ""

    def __init__(self, expected: int):
        super().__init__()
        self.expected = expected
        self.reason: str | None = None

    def match(self, model: ir.Model) -> list:
        raise NotImplementedError

    def rewrite(self, model: ir.Model, matches: list) -> None:
        raise NotImplementedError

    def call(self, model: ir.Model) -> RewriteResult:
        matches = self.match(model)
        reasons = [m for m in matches if isinstance(m, str)]
        if reasons:
            self.reason = reasons[0]
            return RewriteResult(model, False, rewrites=0)
        self.rewrite(model, matches)
        return RewriteResult(model, bool(matches), rewrites=len(matches))


class PerLayerFusion(AllOrNothingFusion):
    """An all-or-nothing fusion with one site per decoder layer; holds `num_layers`."""

    sites = "one per layer"

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.num_layers = num_layers


def derived_initializer(graph: ir.Graph, source: ir.Value, name: str,
                        transform: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> ir.Value:
    """Register an initializer computed from another one when the model is saved.

    The transform (a re-layout: transpose, interleave, ...) runs inside a lazy tensor, so a
    lowering never holds weights in memory: each is read from the checkpoint, re-laid and written
    to external data one tensor at a time.

    Args:
        graph: graph to register the new initializer in.
        source: an initializer whose `const_value` holds (possibly lazy) data.
        name: the new initializer's name.
        transform: numpy array -> a view of it (transpose, reshape, ...) whose C-order elements
            are the new tensor's; it is laid out (and converted to the source's dtype) afterwards
            by one copy, `materialize`. For an expert stack it must act on each expert
            independently (it is applied to [1, ...] slices of the unconverted checkpoint data).
        shape: the new tensor's shape.
    """
    src = source.const_value
    if isinstance(src, StackedLazyTensor):
        # Expert stacks stay streamed: the transform runs on each [1, ...] expert slice, which is
        # right for every re-layout here since none mixes experts.
        tensor = StackedLazyTensor(lambda e: transform(src.part(e)[None])[0], src.count, src.dtype,
                                   ir.Shape(shape), name=name)
    else:
        tensor = ir.LazyTensor(lambda: ir.tensor(materialize(transform(src.numpy()), src.dtype, shape)),
                               dtype=src.dtype, shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(src.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def concatenated_initializer(graph: ir.Graph, sources: list[ir.Value], name: str, axis: int) -> ir.Value:
    """Register an initializer that is `sources` concatenated along `axis`, computed when the
    model is saved (as `derived_initializer`: the sources are read, and each laid out, only then).

    Args:
        graph: graph to register the new initializer in.
        sources: initializers of one dtype whose `const_value`s hold (possibly lazy) data, with
            equal shapes but for `axis`.
        name: the new initializer's name.
        axis: the axis to concatenate along (non-negative).
    """
    tensors = [s.const_value for s in sources]
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise InternalError(f"{name}: cannot concatenate {[t.dtype for t in tensors]}")
    shape = list(sources[0].shape)
    shape[axis] = sum(s.shape[axis] for s in sources)
    tensor = ir.LazyTensor(lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis)),
                           dtype=dtype, shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def expert_initializer(graph: ir.Graph, source: ir.Value, expert: int, name: str,
                       transform: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> ir.Value:
    """Register one expert's slice of an [E, ...] initializer, re-laid by `transform`, lazily.

    Streamed stacks read only that expert from the checkpoint.
    """
    src = source.const_value
    if isinstance(src, StackedLazyTensor):
        def make():
            return ir.tensor(materialize(transform(src.part(expert)), src.dtype, shape))
    else:
        def make():
            return ir.tensor(materialize(transform(src.numpy()[expert]), src.dtype, shape))
    tensor = ir.LazyTensor(make, dtype=src.dtype, shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(src.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def require_opset(model: ir.Model, version: int) -> None:
    """Import at least `version` of the default domain (a fusion emitting a newer standard op)."""
    model.opset_imports[""] = max(model.opset_imports.get("", version), version)


def match_from(patterns: list[pattern.Pattern], graph: ir.Graph, node: ir.Node) -> pattern.MatchResult:
    """The first of `patterns` that matches the subgraph computing `node`, else the failed match
    that got furthest (its `reason` says why).

    Args:
        patterns: onnxscript patterns, typically one rule's `commute()` variants (every order of
            its commutative ops' inputs); used to match only, nothing is rewritten.
        graph: the graph holding `node`.
        node: the node the patterns' output node must match.

    Returns:
        A MatchResult: true with `bindings` on a match, false with `reason` otherwise.
    """
    tries = [p.match(None, graph, node, check_nodes_are_removable=False) for p in patterns]
    return next((m for m in tries if m), None) or max(tries, key=lambda m: m.num_matched_nodes())
