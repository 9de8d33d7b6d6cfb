"""The `portable` target: standard ONNX ops only, for any ONNX runtime (and the no-plugin
TensorRT baseline)."""

from __future__ import annotations

from mixexport import graph_io
from mixexport.errors import InternalError
from mixexport.passes.pipeline import Step
from mixexport.quant import QuantScheme
from mixexport.targets.runtime_files import RuntimeFilesBackend
from mixexport.targets.portable.lowering import LowerMoEToPortable


class PortableBackend(RuntimeFilesBackend):
    name = "portable"
    dtypes = ("float32", "float16", "bfloat16")

    def lowering(self, num_layers: int, quant: QuantScheme | None = None,
                 kv: graph_io.KvLayout = graph_io.CONCAT, provider: str | None = None,
                 library: bool = False) -> list[Step]:
        if library:
            raise InternalError(f"{self.name} has no MoE op library")
        return [("lower_moe_portable", LowerMoEToPortable(quant))]
