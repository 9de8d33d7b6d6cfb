"""What the trt target adds to its manifest entry: the AOT-compiled kernels and the engine.

The schema of both fields and what they name inside OUT live here, beside the code that writes
them (`backend.py`, `engine.py`); the manifest reader and validation's inventory ask the backend
for them (`Backend.manifest_fields`, `Backend.entry_paths`, `Backend.entry_file_groups`).
"""

from __future__ import annotations

from typing import Any

from mixexport.errors import MixexportError
from mixexport.schema import FILE, array, either, exactly, integer, mapping, nullable, record, relative_path, text
from mixexport.targets.trt.engine import ENGINE_FILE, PLUGIN_LIBRARY

# Where the kernels are compiled to (the plugin's CMake build embeds them) and what the engine
# runner loads (runner.py).
KERNELS_DIR = "trt/kernels"
ENGINE_PATH = f"trt/{ENGINE_FILE}"
# The TensorRT engine is validated as a target of its own (beside the trt graph it was built from).
ENGINE_TARGET = "trt-engine"

KERNELS = either(
    (lambda v: v.get("status") == "compiled",
     record({"status": exactly("compiled"), "dir": relative_path, "archs": array(integer(1, 1000), 1, 64),
             "dtype": text(max_len=64), "files": array(FILE)},
            # per architecture: the ptxas that compiled its cubins and the CUDA driver they need
            {"toolkit": mapping(record({"ptxas_version": text(max_len=64), "cuda_for_cubin": text(max_len=64)}))})),
    (lambda v: v.get("status") == "skipped", record({"status": exactly("skipped"), "reason": text()})),
)
_PROFILE = record({"name": text(max_len=256), "shapes": mapping(array(array(integer(), max_len=16), 3, 3))})
ENGINE = either(
    (lambda v: v.get("status") == "not built", record({"status": exactly("not built"), "missing": text()})),
    (lambda v: "file" in v,
     record({"file": relative_path, "files": array(FILE), "tensorrt": text(max_len=64), "gpu": text(max_len=256),
             "profiles": array(_PROFILE, max_len=64), "plugin": text(max_len=256)},
            # timing_cache: where the build kept TensorRT's timing cache (outside OUT; never opened here)
            {"status": exactly("built"), "timing_cache": nullable(text())})),
)
# A staged trt target (`build --stages N`): what was built per stage. mixexport builds the one
# whole-graph engine (`engine`); a stage's engine is built from its graph where it is deployed.
STAGE_ENGINES = record({"status": exactly("not built"), "reason": text()})
FIELDS = {"kernels": KERNELS, "engine": ENGINE, "stage_engines": STAGE_ENGINES}


def engine_built(extra: dict[str, Any]) -> bool:
    """Whether the entry records a built engine (a schema-checked `engine` with a `file`)."""
    return "file" in extra.get("engine", {})


def entry_paths(extra: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field, relative path, kind) of everything in OUT the kernels and engine fields name."""
    kernels, engine = extra.get("kernels", {}), extra.get("engine", {})
    paths = [("kernels.dir", kernels["dir"], "dir")] if "dir" in kernels else []
    paths += [(f"kernels.files[{i}].path", f["path"], "file") for i, f in enumerate(kernels.get("files", []))]
    if "file" in engine:
        paths.append(("engine.file", engine["file"], "file"))
    paths += [(f"engine.files[{i}].path", f["path"], "file") for i, f in enumerate(engine.get("files", []))]
    return paths


def entry_file_groups(extra: dict[str, Any], where: str) -> list[tuple[str, list[dict[str, Any]], str]]:
    """(field, file records, folder they must be in) of the kernels and engine; checks that the
    kernels and the engine are where the plugin build and the runner look for them.

    Raises:
        MixexportError: naming the field (`where` names the entry) at fault.
    """
    kernels, engine = extra.get("kernels", {}), extra.get("engine", {})
    if kernels.get("dir", KERNELS_DIR) != KERNELS_DIR:
        raise MixexportError(f"{where}.kernels.dir is {kernels['dir']!r}; the kernels live in {KERNELS_DIR!r}")
    if engine.get("file", ENGINE_PATH) != ENGINE_PATH:
        raise MixexportError(f"{where}.engine.file is {engine['file']!r}; the engine is {ENGINE_PATH!r}")
    listed = {f["path"] for f in engine.get("files", [])}
    for needed in (ENGINE_PATH, f"trt/{PLUGIN_LIBRARY}") if "file" in engine else ():
        if needed not in listed:
            raise MixexportError(f"{where}.engine.files does not list {needed}")
    return [("kernels.files", kernels.get("files", []), KERNELS_DIR),
            ("engine.files", engine.get("files", []), "trt")]
