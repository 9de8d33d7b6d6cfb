"""The ort target's CPU MoE op library (`plugins/ort_moe`): one `mixexport.ort.MoE` node per layer.

`build --ort-moe-library LIB` keeps each captured MoE node as it is (same inputs, weight layouts
and attributes: `mixexport.model.moe`'s op) in the domain of a custom-op library built from
`plugins/ort_moe`, copies LIB into `OUT/ort` and names it in the manifest (`moe_library`) and in
`genai_config.json` (`custom_ops_library`). The kernel splits every chosen expert's rows over
onnxruntime's intra-op threads and routes in the same node, where the standard-ONNX CPU form runs
one `If` per expert and a dozen small kernels around each expert's MatMuls (measured in
`benchmarks/decode_speed.py`, row "ours ort op").

The library is float32 and full-precision experts only, for onnxruntime's CPU provider. Before a
build uses it, `check_library` loads it and runs its op once against the reference: a library
that does not load, is not this op, or computes something else fails the build in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mixexport.errors import MixexportError, first_line
from mixexport.passes.moe_nodes import MoEMatch
from mixexport.safe_io import read_regular

DOMAIN = "mixexport.ort"
OP = "MoE"
# The library's name inside OUT/ort (whatever the file it was copied from is called).
LIBRARY_FILE = "libmixexport_ort_moe.so"
MANIFEST_FIELD = "moe_library"


# The library built from plugins/ort_moe is about 100 KB; a file far larger is not it.
MAX_LIBRARY_BYTES = 64 * 1024**2


def copy_into(library: Path, folder: Path) -> Path:
    """Copy `library` (a regular file, bounded) into the target folder `folder` as LIBRARY_FILE."""
    copied = folder / LIBRARY_FILE
    copied.write_bytes(read_regular(library, MAX_LIBRARY_BYTES))
    copied.chmod(0o755)
    return copied


def lower_to_library(graph: ir.Graph, m: MoEMatch) -> None:
    """The captured node, moved into the library's domain: its inputs and attributes are the op's."""
    m.node.domain = DOMAIN
    m.node.name = m.name("ort/MoE")


def uses_library(model: Any) -> bool:
    """Whether an onnx.ModelProto holds a node of the library's op (and so needs it loaded)."""
    return any(n.domain == DOMAIN for n in model.graph.node)


def register(options: Any, library: Path) -> None:
    """Load `library` into onnxruntime SessionOptions `options` (one line on failure)."""
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # onnxruntime raises its own exception types, and RuntimeError
        raise MixexportError(f"{library}: onnxruntime cannot load it as a custom-op library "
                             f"({first_line(exc)})") from None


def op_model(w_gate_up: np.ndarray, w_down: np.ndarray, top_k: int, normalize: bool = True) -> bytes:
    """A model of one op node over these float32 weights: inputs x [N, H], router_logits [N, E]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    e, _, h = w_gate_up.shape
    node = helper.make_node(OP, ["x", "router_logits", "w_gate_up", "w_down"], ["y"], domain=DOMAIN, top_k=top_k,
                            normalize=int(normalize))
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", h]),
         helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, ["N", e])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", h])],
        initializer=[numpy_helper.from_array(w_gate_up, "w_gate_up"), numpy_helper.from_array(w_down, "w_down")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_library(library: Path) -> None:
    """Refuse (MixexportError, one line) a library that is not a file, does not load in this
    onnxruntime, or whose op does not compute the reference's MoE on a small probe (odd sizes, a
    tie, a token without a softmax)."""
    import onnxruntime as ort
    import torch

    from mixexport.model.moe import moe_reference

    if not library.is_file():
        raise MixexportError(f"{library}: --ort-moe-library is not a file (build it from plugins/ort_moe)")
    e, h, i, k, n = 5, 37, 19, 2, 6
    rng = np.random.default_rng(0)
    w_gate_up = rng.standard_normal((e, 2 * i, h), dtype=np.float32) * 0.2
    w_down = rng.standard_normal((e, h, i), dtype=np.float32) * 0.2
    x = rng.standard_normal((n, h), dtype=np.float32)
    logits = rng.standard_normal((n, e), dtype=np.float32)
    logits[1] = 0.5  # every expert tied: the lower indices win
    logits[2, 3] = np.nan  # no softmax: a NaN row
    options = ort.SessionOptions()
    register(options, library)
    try:
        session = ort.InferenceSession(op_model(w_gate_up, w_down, k), options,
                                       providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x, "router_logits": logits})
    except Exception as exc:  # onnxruntime's errors
        raise MixexportError(f"{library}: its {DOMAIN}.{OP} op does not run ({first_line(exc)})") from None
    expected = moe_reference(*(torch.from_numpy(a) for a in (x, logits, w_gate_up, w_down)), k, True).numpy()
    if y.shape != expected.shape or not np.array_equal(np.isnan(y), np.isnan(expected)) or \
            not np.allclose(np.nan_to_num(y), np.nan_to_num(expected), rtol=1e-4, atol=1e-5):
        raise MixexportError(f"{library}: its {DOMAIN}.{OP} op does not compute the MoE op's reference on a probe "
                             f"(a different or broken build of plugins/ort_moe)")
