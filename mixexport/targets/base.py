"""What a target backend declares: the one interface the driver, validation and inspection use.

A backend is a deployment target (`portable`, `ort`, `trt`). It says:
- which graph dtypes its runtime serves, and whether it can serve a model at all (`refusal`, a
  capability check that returns the reason when it declines, as torch-tensorrt's converter
  registry does);
- the passes that lower the captured graph for it (`lowering`), run by `lower`;
- how validation runs its graph on this machine (`validation_refusal`, `prepare_validation_model`,
  `configure_session`), always onnxruntime's CPU provider;
- what else it writes into the artifact after its graph (`finish`: runtime files, kernels, engine), and the
  fields that adds to its manifest entry (`manifest_fields`, `entry_paths`, `entry_file_groups`,
  `extra_targets`), so the manifest reader and validation's inventory know no target by name.

Adding a target is a folder `targets/<name>/` with `backend.py` and `lowering.py` and one line in
the registry (`mixexport.targets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import onnx_ir as ir

from mixexport import graph_io
from mixexport.errors import InternalError
from mixexport.passes.pipeline import Step, run_pipeline
from mixexport.schema import Check

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from mixexport.checkpoint.config import MixtralConfig
    from mixexport.quant import QuantScheme

Progress = Callable[[str], None]


class Backend:
    """A deployment target. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    # Graph dtypes the target's runtime serves, and why others are refused.
    dtypes: ClassVar[tuple[str, ...]]
    dtype_reason: ClassVar[str] = ""
    # "domain.op_type" of the fused node its lowering emits per MoE block; None: standard ONNX ops.
    moe_op: ClassVar[str | None] = None
    # The fused node it emits for quantized experts, where that is another op (ort: QMoE).
    quant_moe_op: ClassVar[str | None] = None
    # ... and the op of its CPU MoE library (ort: `build --ort-moe-library`), if it has one.
    library_moe_op: ClassVar[str | None] = None
    # Fields its manifest entry may hold beyond the common ones (name -> schema check); they are
    # the entry's `extra` (`mixexport.artifact.manifest.TargetRecord`).
    manifest_fields: ClassVar[dict[str, Check]] = {}
    # The KV layouts its graphs can have (`graph_io.KV_LAYOUTS`), the first the default.
    kv_layouts: ClassVar[tuple[str, ...]] = ("concat",)
    # onnxruntime execution providers it lowers a different graph for (ort: `cpu`, `cuda`), the
    # first the default; empty: one graph for every runtime, and `provider` arguments are ignored.
    providers: ClassVar[tuple[str, ...]] = ()

    def refusal(self, config: "MixtralConfig", dtype: str) -> str | None:
        """Why this target cannot serve `config` in `dtype`, or None when it can."""
        if dtype not in self.dtypes:
            return f"{self.dtype_reason or 'unsupported'}; it supports {', '.join(self.dtypes)}"
        return None

    def quant_refusal(self, config: "MixtralConfig", scheme: "QuantScheme") -> str | None:
        """Why this target cannot serve `config`'s experts quantized with `scheme`, or None when it can."""
        return None

    def moe_op_for(self, quant: "QuantScheme | None", provider: str | None = None, library: bool = False) -> str | None:
        """The fused MoE node's "domain.op_type" for experts quantized with `quant` (or not), in
        the graph lowered for `provider` (with `library`: to the target's MoE op library)."""
        return self.quant_moe_op if quant is not None and self.quant_moe_op else self.moe_op

    def kv_layout_refusal(self, layout: str) -> str | None:
        """Why this target cannot build its graph with the KV layout `layout`, or None when it can."""
        if layout not in self.kv_layouts:
            return (f"the {self.name} target has the {' and '.join(self.kv_layouts)} KV layout only (the shared "
                    f"buffer needs com.microsoft.GroupQueryAttention: build the ort target)")
        return None

    def lowering(self, num_layers: int, quant: "QuantScheme | None" = None,
                 kv: graph_io.KvLayout = graph_io.CONCAT, provider: str | None = None,
                 library: bool = False) -> list[Step]:
        """(report name, pass) that lower a captured graph of `num_layers` decoder layers, the MoE
        lowering (`lower_moe_<name>`, its experts quantized with `quant` when given, in the form
        for `provider`, one of `providers`, or to its MoE op library with `library`) first, its attention for the KV layout `kv` (one of
        `kv_layouts`); the pipeline adds the common passes around them."""
        raise NotImplementedError

    def lower(self, model: ir.Model, num_layers: int, quant: "QuantScheme | None" = None,
              kv: graph_io.KvLayout = graph_io.CONCAT, provider: str | None = None,
              library: bool = False) -> dict[str, int]:
        """Lower a clone of the captured graph in place (experts quantized with `quant` when
        given, the KV cache in layout `kv`, for onnxruntime's `provider` where the target has
        `providers`); returns the rewrites per pass."""
        if self.kv_layout_refusal(kv.name):
            raise InternalError(f"{self.name} lowering asked for KV layout {kv.name}: {self.kv_layout_refusal(kv.name)}")
        return run_pipeline(model, self.name, self.lowering(num_layers, quant, kv, provider, library), num_layers)

    # -- validation on this machine (onnxruntime, CPU) --------------------------------------------

    def validation_refusal(self, dtype: str) -> str | None:
        """Why onnxruntime's CPU provider cannot run this target's graph in `dtype`, or None."""
        if dtype == "bfloat16":
            return "onnxruntime's CPU kernels do not run bfloat16 graphs"
        return None

    def prepare_validation_model(self, model: "onnx.ModelProto", elem_type: int) -> None:
        """Adapt validation's in-memory copy of the graph so onnxruntime's CPU provider runs it."""

    def configure_session(self, options: "onnxruntime.SessionOptions", library: Path | None = None) -> None:
        """Session options validation's onnxruntime session needs (custom-op libraries), with
        `library`: the target's op library the user named for a graph that needs it (ort:
        `--ort-moe-library`; validation loads native code from an artifact only when named)."""

    # -- artifact ---------------------------------------------------------------------------------

    def finish(self, root: Path, out: Path, manifest: Any, options: Any, record: Callable[[Path], dict],
               progress: Progress, checkpoint: Path) -> None:
        """Write what the target needs beyond its graph into `root` (the artifact being built,
        installed at `out`) and record it in its entry of `manifest`.

        Args:
            manifest: the `mixexport.artifact.manifest.Manifest` being built; this target's
                entry is `manifest.targets[self.name]`, its own fields go in that entry's `extra`.
            options: the build's options (the driver's BuildOptions).
            record: a written file -> its manifest file entry (path, bytes, sha256).
            checkpoint: the checkpoint directory exported (read only: its tokenizer, its ids).
        """

    def entry_paths(self, extra: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(field, path relative to OUT, "file" or "dir") of everything the entry's own fields
        name, which the manifest reader checks are inside OUT."""
        return []

    def entry_file_groups(self, extra: dict[str, Any], where: str) -> list[tuple[str, list[dict[str, Any]], str]]:
        """(field, file records, the folder of OUT they must be in) of the files the entry's own
        fields list, beside its `files`; validation's inventory checks each (`where` names the
        entry in errors)."""
        return []

    def extra_targets(self, extra: dict[str, Any]) -> list[str]:
        """Names validation compares beside the target's graph (trt: its engine, once built)."""
        return []
