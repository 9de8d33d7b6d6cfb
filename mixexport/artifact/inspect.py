"""`mixexport inspect`: what a built artifact or an ONNX file holds, without loading its weights.

An artifact's manifest goes through the same schema and path checks as for validation
(`read_manifest`), and every file is read as a bounded regular file, so a hostile artifact or
a file that is not ONNX gets a one-line error, never a traceback or a hang.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from mixexport import graph_io
from mixexport.artifact.manifest import MANIFEST, artifact_path, read_manifest
from mixexport.capture.moe_op import MOE_DOMAIN, MOE_OP
from mixexport.dtypes import BY_ONNX
from mixexport.errors import MixexportError
from mixexport.safe_io import os_error, read_regular
from mixexport.targets import BACKENDS

# Node kinds that implement a MoE block: the captured op, and each target's fused one.
MOE_KINDS = {(MOE_DOMAIN, MOE_OP), *(tuple(op.rsplit(".", 1)) for b in BACKENDS.values()
                                     for op in (b.moe_op, b.quant_moe_op, b.library_moe_op) if op)}
# A graph whose weights are external is small; protobuf cannot parse more than 2 GiB anyway.
MAX_GRAPH_BYTES = 2 * 1024**3 - 1


def dtype_name(elem_type: int) -> str:
    """The name of an ONNX element type: a graph dtype's canonical name (the dtype table's), any
    other type as numpy names it (int64, uint8), an unknown code (a broken file) by its number."""
    if elem_type in BY_ONNX:
        return BY_ONNX[elem_type].name
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return f"unknown({elem_type})"


def binding(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """A graph input or output as the manifest records it: name, dtype, shape (ints and dimension names)."""
    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": dtype_name(tensor.elem_type), "shape": shape}


def load_graph(path: str | Path) -> onnx.ModelProto:
    """An ONNX graph, without its external data, read as a bounded regular file.

    Raises:
        MixexportError: naming the file when it is missing, not a regular file, too large or not ONNX.
    """
    data = read_regular(path, MAX_GRAPH_BYTES)
    try:
        return onnx.ModelProto.FromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends: any of them means "not ONNX"
        raise MixexportError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Ops, MoE nodes, opsets and bindings of one ONNX file."""
    path = Path(path)
    model = load_graph(path)
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    moe = sum(1 for n in model.graph.node if (n.domain, n.op_type) in MOE_KINDS)
    return {
        "path": str(path),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "moe_nodes": moe,
        "ops": dict(ops.most_common()),
        "inputs": [binding(v) for v in model.graph.input],
        "outputs": [binding(v) for v in model.graph.output],
    }


def stage_chain(root: Path, target: str, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A staged target's chain as inspect shows it: per stage its record (layers, files, bindings,
    which outputs feed the next stage) and its graph's node counts."""
    chain = []
    for i, stage in enumerate(stages):
        graph = inspect_onnx(artifact_path(root, stage["onnx"], f"{root / MANIFEST}: targets.{target}.stages[{i}].onnx"))
        chain.append({**stage, "nodes": graph["nodes"], "moe_nodes": graph["moe_nodes"]})
    return chain


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Inspect an artifact directory (every target) or one ONNX file."""
    path = Path(path)
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        raise os_error(exc, path) from None
    if is_dir:
        if not (path / MANIFEST).exists() and not (path / MANIFEST).is_symlink():
            raise MixexportError(f"{path} has no {MANIFEST}: give a mixexport build directory or a .onnx file")
        manifest = read_manifest(path)
        where = path / MANIFEST
        return {"manifest": {k: getattr(manifest, k) for k in ("model", "dtype", "source", "dynamic_dims", "tools")},
                "experts_quant": manifest.experts_quant,
                "validation": manifest.validation,
                "targets": {t: {**inspect_onnx(artifact_path(path, e.onnx, f"{where}: targets.{t}.onnx")),
                                 "kv_layout": graph_io.kv_layout_of(e.extra),
                                 **({"stages": stage_chain(path, t, e.stages)} if e.stages else {})}
                            for t, e in manifest.targets.items()}}
    return {"targets": {path.stem: inspect_onnx(path)}}
