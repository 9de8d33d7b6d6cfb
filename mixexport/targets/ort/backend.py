"""The `ort` target: onnxruntime's fused contrib ops (`com.microsoft.MoE`, opset-23 Attention,
RotaryEmbedding and RMSNormalization), for onnxruntime on CPU and CUDA (>= 1.24)."""

from __future__ import annotations

from mixexport.passes.pipeline import Step
from mixexport.quant import QuantScheme
from mixexport.targets.runtime_files import RuntimeFilesBackend
from mixexport.targets.ort.fuse_attention import FuseAttentionOrt
from mixexport.targets.ort.fuse_rms_norm import FuseRMSNormOrt
from mixexport.targets.ort.lowering import ORT_DOMAIN, LowerMoEToOrt


class OrtBackend(RuntimeFilesBackend):
    name = "ort"
    # onnxruntime's CPU kernels have no bfloat16 for most ops, and com.microsoft.MoE has none.
    dtypes = ("float32", "float16")
    dtype_reason = "onnxruntime's MoE kernels have no bfloat16"
    moe_op = f"{ORT_DOMAIN}.MoE"
    quant_moe_op = f"{ORT_DOMAIN}.QMoE"

    def lowering(self, num_layers: int, quant: QuantScheme | None = None) -> list[Step]:
        return [
            ("lower_moe_ort", LowerMoEToOrt(quant)),  # com.microsoft.MoE (QMoE), fc1 gate/up interleaved
            # onnxruntime's fused ops; opset 23 is not for portable/trt (TensorRT 10)
            ("fuse_attention_ort", FuseAttentionOrt(num_layers)),  # RotaryEmbedding + Attention
            ("fuse_rms_norm_ort", FuseRMSNormOrt(num_layers)),  # RMSNormalization
        ]

