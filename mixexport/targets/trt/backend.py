"""The `trt` target: one MixtralMoE plugin node per MoE block, for TensorRT with the mixexport
plugin; the build also AOT-compiles the plugin's Triton kernels and, where TensorRT and a GPU are
present, builds the engine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mixexport import graph_io
from mixexport.dtypes import dtype_info
from mixexport.errors import InternalError, MixexportError
from mixexport.kernels.configs import kernel_shape_refusal
from mixexport.passes.pipeline import Step
from mixexport.quant import QuantScheme
from mixexport.targets.base import Backend, Progress
from mixexport.targets.trt import engine
from mixexport.targets.trt import manifest_fields as fields
from mixexport.targets.trt.contract import plugin_contract
from mixexport.targets.trt.lowering import LowerMoEToTrtPlugin

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from mixexport.checkpoint.config import MixtralConfig

# The GPU architectures the AOT compiler compiles the plugin's kernels for.
KERNEL_ARCHS = "80,86,89,90"


class TrtBackend(Backend):
    name = "trt"
    # The plugin has kernels only for the dtypes its contract lists (fp32 tiles do not fit in
    # shared memory).
    dtypes = tuple(plugin_contract()["dtypes"])
    dtype_reason = "the MixtralMoE plugin has no float32 kernels (their tiles do not fit in shared memory)"
    moe_op = f"{plugin_contract()['domain']}.{plugin_contract()['op_type']}"

    def refusal(self, config: "MixtralConfig", dtype: str) -> str | None:
        return super().refusal(config, dtype) or kernel_shape_refusal(
            config.hidden_size, config.intermediate_size, config.num_local_experts)

    def quant_refusal(self, config: "MixtralConfig", scheme: QuantScheme) -> str | None:
        return kernel_shape_refusal(config.hidden_size, config.intermediate_size, config.num_local_experts, scheme)

    def lowering(self, num_layers: int, quant: QuantScheme | None = None,
                 kv: graph_io.KvLayout = graph_io.CONCAT, provider: str | None = None,
                 library: bool = False) -> list[Step]:
        if library:
            raise InternalError(f"{self.name} has no MoE op library")
        return [("lower_moe_trt", LowerMoEToTrtPlugin(quant))]

    def prepare_validation_model(self, model: "onnx.ModelProto", elem_type: int) -> None:
        from mixexport.targets.trt.cpu_plugin import use_cpu_plugin

        use_cpu_plugin(model, elem_type)

    def configure_session(self, options: "onnxruntime.SessionOptions", library: Path | None = None) -> None:
        from mixexport.targets.trt.cpu_plugin import register

        options.register_custom_ops_library(register())

    manifest_fields = fields.FIELDS

    def finish(self, root: Path, out: Path, manifest: Any, options: Any, record: Callable[[Path], dict],
               progress: Progress, checkpoint: Path) -> None:
        extra = manifest.targets["trt"].extra
        if options.trt_kernels:
            extra["kernels"] = _write_kernels(root, manifest.dtype, options.experts_quant, record, progress)
        _try_engine(root, out, manifest, options, record, progress)
        stages = manifest.targets["trt"].stages
        if stages:
            reason = ("mixexport builds one engine, of the whole graph; each stage's engine is built from its graph "
                      "(trt/stage-{i}/model.onnx, the MixtralMoE plugin node inside) with trtexec --onnx=... "
                      "--plugins=... on the GPU that serves the stage")
            extra["stage_engines"] = {"status": "not built", "reason": reason}
            progress(f"trt: {len(stages)} TensorRT-ready stage graphs written ({', '.join(s['onnx'] for s in stages)}); "
                     f"no per-stage engines: {reason}")

    def entry_paths(self, extra: dict[str, Any]) -> list[tuple[str, str, str]]:
        return fields.entry_paths(extra)

    def entry_file_groups(self, extra: dict[str, Any], where: str) -> list[tuple[str, list[dict[str, Any]], str]]:
        return fields.entry_file_groups(extra, where)

    def extra_targets(self, extra: dict[str, Any]) -> list[str]:
        return [fields.ENGINE_TARGET] if fields.engine_built(extra) else []


def _write_kernels(root: Path, dtype: str, quant: QuantScheme | None, record: Callable[[Path], dict],
                   progress: Progress) -> dict:
    """AOT-compile the MixtralMoE kernels (cubin + PTX + metadata) into OUT/trt/kernels, which the
    plugin's CMake build embeds (-DMIXEXPORT_AOT_DIR). `refusal` has checked dtype and shapes."""
    if importlib.util.find_spec("triton") is None:
        progress("trt: kernels not compiled: triton is missing (pip install 'mixexport[kernels]')")
        return {"status": "skipped", "reason": "triton not installed"}
    start = time.perf_counter()
    folder = root / "trt" / "kernels"
    # A subprocess, without TRITON_INTERPRET: the AOT compile must see real GPU targets.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "mixexport.kernels.aot", "--arch", KERNEL_ARCHS,
                          "--dtype", dtype_info(dtype).short, "--quant", quant.name if quant else "none",
                          "-o", str(folder)], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise InternalError(f"AOT kernel compile failed:\n{run.stderr[-2000:]}")
    files = sorted(folder.iterdir())
    toolkit = _toolkits(folder)
    progress(f"trt: {len(files)} kernel files for sm_{KERNEL_ARCHS.replace(',', ', sm_')} compiled in "
             f"{time.perf_counter() - start:.1f}s; the cubins need a CUDA "
             + ", ".join(f"{t['cuda_for_cubin']}+ driver for sm_{arch}" for arch, t in toolkit.items()))
    return {"status": "compiled", "dir": "trt/kernels", "archs": [int(a) for a in KERNEL_ARCHS.split(",")],
            "dtype": dtype_info(dtype).short, "files": [record(f) for f in files], "toolkit": toolkit}


def _toolkits(folder: Path) -> dict[str, dict[str, str]]:
    """Per architecture, the ptxas that compiled the kernels and the CUDA (driver) version their
    cubins need, from the AOT metadata (`toolkit` of each variant)."""
    index = json.loads((folder / "index.json").read_text())
    toolkit = {}
    for variant in index["variants"]:
        meta = json.loads((folder / variant["metadata"]).read_text())["toolkit"]
        toolkit[str(variant["arch"])] = {"ptxas_version": meta["ptxas_version"], "cuda_for_cubin": meta["cuda_for_cubin"]}
    return toolkit


def _try_engine(root: Path, out: Path, manifest: Any, options: Any, record: Callable[[Path], dict],
                progress: Progress) -> None:
    """Build the TensorRT engine where TensorRT, a GPU and the plugin are at hand; otherwise say how."""
    entry = manifest.targets["trt"].extra
    kernels = entry.get("kernels", {})
    if kernels.get("status") == "skipped":
        entry["engine"] = {"status": "not built", "missing": f"plugin kernels ({kernels['reason']})"}
        progress(f"trt: TensorRT-ready ONNX written; no engine for it: {kernels['reason']}")
        return
    missing = None
    if importlib.util.find_spec("tensorrt") is None:
        missing = "TensorRT"
    elif engine.gpu_name() is None:
        missing = "an NVIDIA GPU"
    else:
        try:
            engine.find_plugin_library(options.plugin)
        except MixexportError:
            missing = "the MixtralMoE plugin library"
    if missing:
        entry["engine"] = {"status": "not built", "missing": missing}
        progress(f"trt: TensorRT-ready ONNX written; no engine here (missing {missing}). On a GPU machine:")
        for line in engine.finish_instructions(out, kernels.get("status") == "compiled"):
            progress(f"    {line}")
        return
    entry["engine"] = engine.build_engine(root, manifest, record, options.plugin, progress=progress)
