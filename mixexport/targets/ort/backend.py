"""The `ort` target: onnxruntime's fused contrib ops (`com.microsoft.MoE`, opset-23 Attention,
RotaryEmbedding and RMSNormalization), for onnxruntime on CPU and CUDA (>= 1.24)."""

from __future__ import annotations

from mixexport import graph_io
from mixexport.passes.pipeline import Step
from mixexport.quant import QuantScheme
from mixexport.schema import text
from mixexport.targets.runtime_files import RuntimeFilesBackend
from mixexport.targets.ort.fuse_attention import FuseAttentionOrt
from mixexport.targets.ort.fuse_gqa import FuseGroupQueryAttentionOrt
from mixexport.targets.ort.fuse_rms_norm import FuseRMSNormOrt
from mixexport.targets.ort.lowering import ORT_DOMAIN, LowerMoEToOrt


class OrtBackend(RuntimeFilesBackend):
    name = "ort"
    # onnxruntime's CPU kernels have no bfloat16 for most ops, and com.microsoft.MoE has none.
    dtypes = ("float32", "float16")
    dtype_reason = "onnxruntime's MoE kernels have no bfloat16"
    moe_op = f"{ORT_DOMAIN}.MoE"
    quant_moe_op = f"{ORT_DOMAIN}.QMoE"
    # concat: opset-23 Attention; shared: com.microsoft.GroupQueryAttention over static buffers.
    kv_layouts = graph_io.KV_LAYOUTS
    manifest_fields = {graph_io.KV_LAYOUT_FIELD: text(graph_io.KV_LAYOUTS)}

    def lowering(self, num_layers: int, quant: QuantScheme | None = None,
                 kv: graph_io.KvLayout = graph_io.CONCAT) -> list[Step]:
        attention = (("fuse_attention_ort", FuseAttentionOrt(num_layers)) if kv.name == "concat" else
                     ("fuse_gqa_ort", FuseGroupQueryAttentionOrt(num_layers, kv.sliding_window)))
        return [
            ("lower_moe_ort", LowerMoEToOrt(quant)),  # com.microsoft.MoE (QMoE), fc1 gate/up interleaved
            # onnxruntime's fused ops; opset 23 is not for portable/trt (TensorRT 10)
            attention,  # RotaryEmbedding + Attention, or + GroupQueryAttention (shared KV buffers)
            ("fuse_rms_norm_ort", FuseRMSNormOrt(num_layers)),  # RMSNormalization
        ]

