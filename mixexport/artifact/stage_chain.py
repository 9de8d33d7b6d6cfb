"""The manifest's record of a staged target (`mixexport build --stages N`): the chain of stage graphs.

A staged target's entry holds `stages`, in chain order. Each stage record says which part of the
decoder it is (`layers` [first, end), `embedding`, `head`), its graph and its external data
(`onnx`, `data`: paths in OUT, each also listed, hashed, in the entry's `files`), its bindings (as
the graph's, names, dtypes and dynamic dimension names), and `next`: which of its outputs feed
which inputs of the next stage. Every other input of a stage is the whole graph's input of the same
name (the caller feeds the same `attention_mask`, `position_ids` and each layer's past to the
stage that holds the layer), every other output the whole graph's output of that name.

The layout is fixed: stage i of target T is `T/stage-{i}/model.onnx` with its weights in
`T/stage-{i}/model.onnx.data`, so a manifest cannot point a stage at another stage's files.
"""

from __future__ import annotations

from typing import Any

from mixexport import graph_io
from mixexport.schema import Invalid, join

STAGE_DIR = "stage-{index}"
STAGE_ONNX, STAGE_DATA = "model.onnx", "model.onnx.data"
# A stage holds at least one layer; 1024 stages is far beyond any model's layer count.
MAX_STAGES = 1024



def stage_folder(target: str, index: int) -> str:
    """OUT-relative folder of stage `index` of `target`."""
    return f"{target}/{STAGE_DIR.format(index=index)}"


def as_stage(record_: dict[str, Any]) -> graph_io.Stage:
    """The `graph_io.Stage` a (schema-checked) stage record describes."""
    first, end = record_["layers"]
    return graph_io.Stage(first, end, embedding=record_["embedding"], head=record_["head"])


def stage_record(index: int, target: str, stage: graph_io.Stage, inputs: list[dict], outputs: list[dict],
                 next_stage: graph_io.Stage | None) -> dict[str, Any]:
    """The manifest record of stage `index` of `target` (`inputs`/`outputs`: its graph's bindings)."""
    folder = stage_folder(target, index)
    fed = {graph_io.hidden_state_name(stage.end): graph_io.hidden_state_name(next_stage.first)} if next_stage else {}
    return {"name": stage.name, "layers": [stage.first, stage.end], "embedding": stage.embedding, "head": stage.head,
            "onnx": f"{folder}/{STAGE_ONNX}", "data": [f"{folder}/{STAGE_DATA}"], "inputs": inputs,
            "outputs": outputs, "next": fed}


def check_chain(target: str, entry: dict[str, Any], num_layers: int, where: str) -> None:
    """Check a schema-checked staged entry: the stages are the whole decoder in order, each in its
    own folder with its files listed (so hashed) in `files`, and `next` links real bindings.

    Args:
        target: the target's name (its folder in OUT).
        entry: the target's manifest entry (with `stages`).
        num_layers: the model's decoder layers (`model.num_hidden_layers`).
        where: the entry's field path, for errors (`targets.ort`).

    Raises:
        Invalid: naming the field at fault.
    """
    stages = entry["stages"]
    listed = {f["path"] for f in entry["files"]}
    whole_inputs = {b["name"] for b in entry["inputs"]}
    whole_outputs = {b["name"] for b in entry["outputs"]}
    expected_first = 0
    for i, stage in enumerate(stages):
        at = f"{where}.stages[{i}]"
        first, end = stage["layers"]
        if first != expected_first or end <= first or end > num_layers:
            raise Invalid(join(at, "layers"), f"is [{first}, {end}]: stages hold contiguous, non-empty layer ranges "
                                              f"in order, {expected_first} next, of the model's {num_layers}")
        expected_first = end
        if stage["embedding"] != (i == 0) or stage["head"] != (i == len(stages) - 1):
            raise Invalid(at, "the embedding belongs to the first stage and the head to the last, and only there")
        if stage["name"] != as_stage(stage).name:
            raise Invalid(join(at, "name"), f"is {stage['name']!r}; this stage is {as_stage(stage).name!r}")
        folder = stage_folder(target, i)
        if stage["onnx"] != f"{folder}/{STAGE_ONNX}":
            raise Invalid(join(at, "onnx"), f"is {stage['onnx']!r}; stage {i}'s graph is {folder}/{STAGE_ONNX!r}")
        for field, path in [("onnx", stage["onnx"]), *((f"data[{k}]", p) for k, p in enumerate(stage["data"]))]:
            if not path.startswith(f"{folder}/"):
                raise Invalid(join(at, field), f"is {path!r}, outside {folder}/: a stage reads only its own files")
            if path not in listed:
                raise Invalid(join(at, field), f"names {path}, which {where}.files does not list (and hash)")
        outputs = {b["name"] for b in stage["outputs"]}
        following = stages[i + 1] if i + 1 < len(stages) else None
        next_inputs = {b["name"] for b in following["inputs"]} if following else set()
        for output, fed in stage["next"].items():
            if output not in outputs or fed not in next_inputs:
                raise Invalid(join(at, "next"), f"links {output!r} -> {fed!r}, which are not an output of this stage "
                                                f"and an input of the next")
        for output in outputs - set(stage["next"]):
            if output not in whole_outputs:
                raise Invalid(join(at, "outputs"), f"has {output!r}, which feeds no stage and is not an output of "
                                                   f"the whole graph")
        previous = stages[i - 1]["next"].values() if i else ()
        for binding in stage["inputs"]:
            if binding["name"] not in whole_inputs and binding["name"] not in previous:
                raise Invalid(join(at, "inputs"), f"has {binding['name']!r}, which the previous stage does not feed "
                                                  f"and the whole graph does not take")
    if expected_first != num_layers:
        raise Invalid(join(where, "stages"), f"cover layers [0, {expected_first}) of the model's {num_layers}")
