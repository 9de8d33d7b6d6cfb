"""Write a target as a chain of stage graphs (`mixexport build --stages N`): the layout for
pipeline parallelism (one stage per GPU, a Triton Inference Server ensemble, a TensorRT engine per
stage).

The N stages are contiguous layer ranges balanced by bytes: the embedding joins the first stage
and the final norm + lm_head the last (a stage without a layer would be a GPU holding a lookup
table or one matmul while the others hold the model), and the ranges are chosen so that the
largest stage is as small as it can be. Each stage is cut from the lowered graph
(`passes.stages.cut_stage`) and saved with `save_model` into `OUT/<target>/stage-{i}/`: its own
`model.onnx` and `model.onnx.data`, holding only its own weights, streamed from the checkpoint
(the cut shares the lowered graph's lazy tensors, so memory stays flat).

The target keeps its whole graph too: `OUT/<target>/model.onnx` references the stages' data files
(`stage-{i}/model.onnx.data`) instead of a copy, so the weights are on disk once, and whatever
reads the whole graph (onnxruntime-genai and Optimum through the runtime files, `mixexport
generate`, whole-model validation, the trt engine build) works on a staged target unchanged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir

from mixexport import graph_io
from mixexport.artifact.inspect import binding
from mixexport.artifact.save import INLINE_BYTES, ONNX_FILE, save_model
from mixexport.artifact.stage_chain import STAGE_DATA, stage_folder, stage_record
from mixexport.checkpoint.config import MixtralConfig
from mixexport.errors import InternalError, MixexportError
from mixexport.passes.stages import cut_stage, weight_owner

Progress = Callable[[str], None]


def part_bytes(model: ir.Model, num_layers: int) -> list[int]:
    """Bytes of each stage-sized part's weights: layer i's, with the embedding's added to layer 0
    and the head's to the last layer (they travel with them). Shared constants are not counted."""
    sizes = [0] * num_layers
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is None:
                continue
            owner = weight_owner(value.name)
            if owner is None:
                continue
            index = 0 if owner == "embedding" else num_layers - 1 if owner == "head" else owner
            sizes[index] += value.const_value.nbytes
    return sizes


def balanced_stages(sizes: list[int], count: int) -> list[graph_io.Stage]:
    """`count` contiguous, non-empty layer ranges whose largest byte total is the smallest possible.

    A linear partition by dynamic programming: best[k][j] is the smallest largest-stage total of
    layers [0, j) cut into k stages. O(count * L^2) steps, nothing for L in the hundreds.

    Args:
        sizes: bytes per layer (`part_bytes`: the embedding in layer 0's, the head in the last's).
        count: stages, 1 <= count <= len(sizes).

    Returns:
        the stages in chain order, the first with the embedding and the last with the head.
    """
    n = len(sizes)
    if not 1 <= count <= n:
        raise InternalError(f"cannot cut {n} layers into {count} stages")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(count + 1)]
    cut = [[0] * (n + 1) for _ in range(count + 1)]
    best[0][0] = 0
    for k in range(1, count + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):  # the last stage is layers [i, j)
                largest = max(best[k - 1][i], prefix[j] - prefix[i])
                if largest < best[k][j]:
                    best[k][j], cut[k][j] = largest, i
    bounds, j = [n], n
    for k in range(count, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.reverse()
    return [graph_io.Stage(first, end, embedding=first == 0, head=end == n)
            for first, end in zip(bounds, bounds[1:])]


def save_stages(model: ir.Model, stages: list[graph_io.Stage], config: MixtralConfig, dtype: str, root: Path,
                target: str, progress: Progress) -> tuple[list[dict], list[dict]]:
    """Write `root/target/stage-{i}/` for each stage and the whole graph `root/target/model.onnx`
    over the stages' data files.

    Args:
        model: the lowered whole graph (lazy weights); its initializers end up referencing the
            stages' data files.
        stages: the chain (`balanced_stages`).
        config, dtype: the model and graph dtype (the stages' boundary bindings).
        root: the artifact being built; `root/target` exists.
        target: the target's name.
        progress: one line per stage written (stage i/N, bytes, elapsed).

    Returns:
        (the manifest file entries: the whole graph, then each stage's graph and data; the stage
        records of `artifact.stage_chain`).
    """
    folder = root / target
    files: list[dict] = []
    records: list[dict] = []
    weights: dict[str, tuple[str, ir.ExternalTensor]] = {}  # initializer -> (stage folder, where it was written)
    start = time.perf_counter()
    for index, stage in enumerate(stages):
        stage_model = cut_stage(model, stage, config, dtype)
        sub = root / stage_folder(target, index)
        sub.mkdir()
        label = f"{target} stage {index + 1}/{len(stages)} ({stage.name})"
        written = save_model(stage_model, sub, root, label, progress)
        files += written
        for graph in stage_model.graphs():
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    weights.setdefault(value.name, (sub.name, value.const_value))
        proto = onnx.load(str(sub / ONNX_FILE), load_external_data=False)
        following = stages[index + 1] if index + 1 < len(stages) else None
        records.append(stage_record(index, target, stage, [binding(v) for v in proto.graph.input],
                                    [binding(v) for v in proto.graph.output], following))
        progress(f"{label}: {sum(f['bytes'] for f in written) / 1e6:.1f} MB written, "
                 f"{time.perf_counter() - start:.1f}s elapsed")
    files.insert(0, _save_whole_graph(model, folder, root, weights))
    return files, records


def _save_whole_graph(model: ir.Model, folder: Path, root: Path,
                      weights: dict[str, tuple[str, ir.ExternalTensor]]) -> dict:
    """`folder/model.onnx`, every external weight read from the stage file it was written to."""
    from mixexport.artifact.manifest import file_entry

    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes <= INLINE_BYTES:
                continue
            if value.name not in weights:
                # Every weight some output needs is in a stage; one that is in none would be
                # inlined into the whole graph's protobuf here, silently.
                raise InternalError(f"weight {value.name} of the whole graph is in no stage")
            stage_dir, written = weights[value.name]
            value.const_value = ir.ExternalTensor(f"{stage_dir}/{STAGE_DATA}", written.offset, written.length,
                                                  written.dtype, shape=written.shape, name=value.name, base_dir=folder)
    path = folder / ONNX_FILE
    ir.save(model, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return file_entry(path, root)


def check_stage_options(count: int | None, num_layers: int, quantized: bool) -> None:
    """Refuse `--stages` values this build cannot honour, before anything is written.

    Raises:
        MixexportError: for more stages than layers, or stages of quantized experts (whose stage
            comparison, against the layer-streamed reference, has no dequantized path yet).
    """
    if count is None or count == 1:  # one stage is the whole graph: the default layout
        return
    if count > num_layers:
        raise MixexportError(f"--stages {count} exceeds the model's {num_layers} decoder layers (each stage holds "
                             f"at least one layer)")
    if quantized:
        raise MixexportError(f"--stages {count} with --experts-quant is not supported: stage validation compares "
                             f"against the layer-streamed reference, which has no quantized-experts path yet")
