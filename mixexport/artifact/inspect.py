"""`mixexport inspect`: what a built artifact or an ONNX file holds, without loading its weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from mixexport.artifact.manifest import MANIFEST, read_manifest
from mixexport.errors import MixexportError

# Node kinds that implement a MoE block, whichever target the graph is for.
MOE_KINDS = {("mixexport", "MoE"), ("com.microsoft", "MoE"), ("trt.plugins", "MixtralMoE")}


def _binding(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            if tensor.elem_type != onnx.TensorProto.BFLOAT16 else "bfloat16", "shape": shape}


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise MixexportError(f"{path} not found") from None
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise MixexportError(f"{path} is not a readable ONNX model ({exc})") from None
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    moe = sum(1 for n in model.graph.node if (n.domain, n.op_type) in MOE_KINDS)
    return {
        "path": str(path),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "moe_nodes": moe,
        "ops": dict(ops.most_common()),
        "inputs": [_binding(v) for v in model.graph.input],
        "outputs": [_binding(v) for v in model.graph.output],
    }


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Inspect an artifact directory (every target) or one ONNX file."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST).exists():
            raise MixexportError(f"{path} has no {MANIFEST}: give a mixexport build directory or a .onnx file")
        manifest = read_manifest(path)
        return {"manifest": {k: manifest[k] for k in ("model", "dtype", "source", "dynamic_dims", "tools")},
                "validation": manifest.get("validation"),
                "targets": {t: inspect_onnx(path / e["onnx"]) for t, e in manifest["targets"].items()}}
    return {"targets": {path.stem: inspect_onnx(path)}}
