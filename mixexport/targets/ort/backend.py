"""The `ort` target: onnxruntime's fused contrib ops (opset-23 Attention, RotaryEmbedding and
RMSNormalization) and, per execution provider, the MoE form it runs fastest (`ort/lowering.py`:
the sparse standard-ONNX form on CPU, `com.microsoft.MoE`/`QMoE` on CUDA), for onnxruntime >= 1.24."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mixexport import graph_io
from mixexport.passes.pipeline import Step
from mixexport.quant import QuantScheme
from mixexport.schema import text
from mixexport.targets.base import Progress
from mixexport.targets.runtime_files import RuntimeFilesBackend
from mixexport.targets.ort.fold import FoldForOrt
from mixexport.targets.ort.fuse_attention import FuseAttentionOrt
from mixexport.targets.ort.fuse_gqa import FuseGroupQueryAttentionOrt
from mixexport.targets.ort.fuse_qkv import FuseQkvOrt
from mixexport.targets.ort.fuse_rms_norm import FuseRMSNormOrt
from mixexport.targets.ort import moe_library
from mixexport.targets.ort.lowering import ORT_DOMAIN, PROVIDERS, LowerMoEToOrt, uses_sparse_form


class OrtBackend(RuntimeFilesBackend):
    name = "ort"
    # onnxruntime's CPU kernels have no bfloat16 for most ops, and com.microsoft.MoE has none.
    dtypes = ("float32", "float16")
    dtype_reason = "onnxruntime's MoE kernels have no bfloat16"
    moe_op = f"{ORT_DOMAIN}.MoE"
    quant_moe_op = f"{ORT_DOMAIN}.QMoE"
    providers = PROVIDERS
    # concat: opset-23 Attention; shared: com.microsoft.GroupQueryAttention over static buffers.
    kv_layouts = graph_io.KV_LAYOUTS
    # The provider the graph was lowered for (`--ort-provider`); absent in artifacts of earlier
    # versions, whose graphs were the fused (`cuda`) form.
    # `moe_library`: the CPU MoE op library's file in OUT/ort, for a graph built with --ort-moe-library.
    manifest_fields = {graph_io.KV_LAYOUT_FIELD: text(graph_io.KV_LAYOUTS), "provider": text(PROVIDERS),
                       moe_library.MANIFEST_FIELD: text((moe_library.LIBRARY_FILE,))}

    library_moe_op = f"{moe_library.DOMAIN}.{moe_library.OP}"

    def moe_op_for(self, quant: QuantScheme | None, provider: str | None = None, library: bool = False) -> str | None:
        if library:
            return self.library_moe_op
        if uses_sparse_form(quant, provider or PROVIDERS[0]):
            return None
        return super().moe_op_for(quant, provider)

    def lowering(self, num_layers: int, quant: QuantScheme | None = None,
                 kv: graph_io.KvLayout = graph_io.CONCAT, provider: str | None = None,
                 library: bool = False) -> list[Step]:
        attention = (("fuse_attention_ort", FuseAttentionOrt(num_layers)) if kv.name == "concat" else
                     ("fuse_gqa_ort", FuseGroupQueryAttentionOrt(num_layers, kv.sliding_window)))
        return [
            # the sparse form (CPU), com.microsoft.MoE (QMoE) with fc1 gate/up interleaved, or the
            # CPU MoE library's op (--ort-moe-library)
            ("lower_moe_ort", LowerMoEToOrt(quant, provider or PROVIDERS[0], library)),
            # onnxruntime's fused ops; opset 23 is not for portable/trt (TensorRT 10)
            attention,  # RotaryEmbedding + Attention, or + GroupQueryAttention (shared KV buffers)
            ("fuse_qkv_ort", FuseQkvOrt(num_layers)),  # one q|k|v MatMul + Split (after: attention finds q, k, v)
            ("fuse_rms_norm_ort", FuseRMSNormOrt(num_layers)),  # RMSNormalization
            ("fold_ort", FoldForOrt()),  # what onnxruntime would fold and fuse at load, done here
        ]

    def for_cpu(self, options: Any) -> bool:
        return options.ort_provider == "cpu"

    def configure_session(self, options: Any, library: Path | None = None) -> None:
        if library is not None:
            moe_library.register(options, library)

    def finish(self, root: Path, out: Path, manifest: Any, options: Any, record: Callable[[Path], dict],
               progress: Progress, checkpoint: Path) -> None:
        target = manifest.targets[self.name]
        target.extra["provider"] = options.ort_provider
        if options.ort_moe_library is not None:
            copied = moe_library.copy_into(options.ort_moe_library, root / self.name)
            target.files.append(record(copied))
            target.extra[moe_library.MANIFEST_FIELD] = copied.name
            progress(f"{self.name}: {copied.name} (the MoE op library, {copied.stat().st_size / 1e3:.0f} KB) beside "
                     f"the graph; onnxruntime must load it: genai_config.json names it, other sessions "
                     f"register_custom_ops_library it")
        super().finish(root, out, manifest, options, record, progress, checkpoint)
