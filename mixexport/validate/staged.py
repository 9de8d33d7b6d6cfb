"""Validation of a staged artifact (`build --stages N`): each stage graph and the chain they make.

A staged target is validated three ways, and passes only when all three pass:
- its whole graph, as any target (whole-model or streamed mode, `validate.parity`);
- each of its stage graphs, the files a pipeline-parallel runtime loads, against the layer-streamed
  reference (`validate.streamed`), fed the reference's boundary tensors (teacher forcing), so a
  broken stage is named even where the stages after it are right;
- the chain: the stage graphs run in sequence from input_ids to logits, each fed what the stage
  before it output, on the prefill and decode steps, compared with the reference's logits and
  present (and router logits) as whole-model validation compares the whole graph. A chain that
  compared no logits has not passed.

Both stage checks share one pass over the checkpoint, one stage at a time, as streamed validation
reads it: they hold one stage (its reference part and its session, about 3x its weights), and a
stage that does not fit in the memory available is "not validated", never skipped as passed. The
decode steps' tokens are streamed validation's (seeded), not the reference's greedy ones.
"""

from __future__ import annotations

from typing import Any, Callable

from mixexport import graph_io
from mixexport.checkpoint.config import MixtralConfig
from mixexport.safe_io import format_bytes
from mixexport.validate.inventory import FileHashes, TargetGraph
from mixexport.validate.streamed import Progress, held_while_comparing, memory_available, streamed_compare


def stage_validation_model(graph: TargetGraph, stage: graph_io.Stage, config: MixtralConfig) -> Callable[[], bytes]:
    """The artifact's own graph of `stage` (not a cut of the whole graph) as validation runs it:
    its layers' router logits also output, its external data found in its stage's folder."""
    (staged,) = [s for s in graph.stages if s.stage == stage]

    def build() -> bytes:
        from mixexport.validate.parity import adapted_for_validation

        return adapted_for_validation(staged.model, graph.name, graph.dtype, range(stage.first, stage.end),
                                      lambda location: f"{staged.folder}/{location}")
    return build


def compare_stages(to_run: list[tuple[str, TargetGraph]], ckpt, dtype: str, tolerances: dict, decode_steps: int,
                   progress: Progress, hashes: FileHashes | None = None) -> dict[str, dict[str, Any]]:
    """Compare each staged target's stages and chain with the layer-streamed reference.

    Args:
        to_run: (target name, its graph) of the staged targets to compare (`TargetGraph.stages`).
        ckpt, dtype, tolerances, decode_steps, progress, hashes: as `streamed_compare`'s.

    Returns:
        per target: `stages` (the per-stage report, `failed_stages` naming any broken stage) and
        `chain` (the chained report), each with its status; both "not validated" where the
        target's largest stage does not fit in the memory available.
    """
    from mixexport.validate.parity import NOT_VALIDATED

    groups: dict[tuple[graph_io.Stage, ...], list[tuple[str, TargetGraph]]] = {}
    results = {}
    for name, graph in to_run:  # targets cut alike share one pass over the checkpoint
        reason = _memory_refusal(graph, dtype)
        if reason:
            progress(f"{name}: stage graphs not compared: {reason}")
            refused = {"status": NOT_VALIDATED, "reason": reason}
            results[name] = {"stages": refused, "chain": refused}
        else:
            groups.setdefault(tuple(s.stage for s in graph.stages), []).append((name, graph))
    for stages, members in groups.items():
        progress(f"comparing the {len(stages)} stage graphs of {', '.join(name for name, _ in members)}, each fed "
                 f"the reference's boundary, and their chain, input_ids to logits, each stage fed the one before")
        chains = {f"{name} chain": (name, graph) for name, graph in members}
        compared = streamed_compare([*members, *((key, graph) for key, (_, graph) in chains.items())], ckpt, dtype,
                                    tolerances, decode_steps, progress, stages=list(stages),
                                    stage_model=stage_validation_model, chained=frozenset(chains), hashes=hashes)
        for key, (name, _) in chains.items():
            results[name] = {"stages": compared[name], "chain": _fail_closed(compared[key]),
                             "stage_decode_tokens": "seeded random"}  # streamed validation's scenario
    return results


def _memory_refusal(graph: TargetGraph, dtype: str) -> str | None:
    """Why the target's largest stage cannot be compared in the memory available now, or None.

    A stage is compared whole (its own graph file, the one a runtime loads): its onnxruntime
    session and its part of the reference hold about 3x its weights, however the whole graph is
    validated.
    """
    largest = max(s.weight_bytes for s in graph.stages)
    need, available = held_while_comparing(largest, dtype), memory_available()
    if available is None or need <= available:
        return None
    return (f"comparing its largest stage ({format_bytes(largest)} of weights) would hold about {format_bytes(need)}, "
            f"{format_bytes(available)} are available: validate on a machine with more memory, or build with more "
            f"--stages")


def _fail_closed(chain: dict[str, Any]) -> dict[str, Any]:
    """A chain passes only when its logits were compared (its head stage ran and matched)."""
    if chain["status"] == "pass" and chain["max_abs_diff"].get("logits") is None:
        return {**chain, "status": "fail", "reason": "the chain compared no logits"}
    return chain


def with_stages(whole: dict[str, Any], staged: dict[str, Any]) -> dict[str, Any]:
    """A staged target's result: its whole graph's, with its stages' and chain's reports beside.
    It passes only when all three passed; it fails when any failed, and is otherwise "not
    validated" (a part that could not be compared here)."""
    from mixexport.validate.parity import NOT_VALIDATED

    result = {**whole, **staged}
    parts = (("whole graph", whole), ("stages", staged["stages"]), ("chain", staged["chain"]))
    short = [(part, report) for part, report in parts if report["status"] != "pass"]
    if short:
        result["status"] = "fail" if any(report["status"] == "fail" for _, report in short) else NOT_VALIDATED
        result["reason"] = "; ".join(f"{part}: {report.get('reason', 'outside tolerance')}" for part, report in short)
    return result
