"""TensorRT engine for the `trt` target: optimization profiles, plugin loading, engine build.

TensorRT is imported lazily and only here: everything else in mixexport runs without it. The
profiles are plain data computed from the manifest (and tested on CPU); the build goes through
Polygraphy's TensorRT loaders.

Two optimization profiles, as LLM runtimes use them:
- 0 "context" (prefill): batch 1..max_batch, sequence 1..max_sequence, past 0;
- 1 "generation" (decode): batch 1..max_batch, sequence 1, past 1..max_context-1.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from mixexport import graph_io
from mixexport.errors import MixexportError

ENGINE_FILE = "model.engine"
PLUGIN_LIBRARY = "libmixexport_plugins.so"
PLUGIN_ENV = "MIXEXPORT_PLUGIN_LIB"
DEFAULT_TIMING_CACHE = Path.home() / ".cache" / "mixexport" / "tensorrt.timing.cache"
PROFILE_NAMES = ("context", "generation")

Shape = tuple[int, ...]


def optimization_profiles(manifest: Any) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """(min, opt, max) shape per input for the context and generation profiles.

    Args:
        manifest: an artifact's `Manifest` (its `dynamic_dims` and the trt target's input bindings).
    """
    dims = manifest.dynamic_dims
    max_batch = dims[graph_io.BATCH][1]
    max_seq = dims[graph_io.SEQUENCE][1]
    max_total = dims[graph_io.TOTAL][1]
    if max_total < 2:
        raise MixexportError("a decode profile needs a context of at least 2 tokens (--max-context)")
    opt_batch = max(1, max_batch // 2)
    # Each symbolic dimension's (min, opt, max) per profile.
    ranges = {
        "context": {graph_io.BATCH: (1, opt_batch, max_batch), graph_io.SEQUENCE: (1, min(128, max_seq), max_seq),
                    graph_io.PAST: (0, 0, 0), graph_io.TOTAL: (1, min(128, max_seq), max_seq)},
        "generation": {graph_io.BATCH: (1, opt_batch, max_batch), graph_io.SEQUENCE: (1, 1, 1),
                       graph_io.PAST: (1, max_total // 2, max_total - 1),
                       graph_io.TOTAL: (2, max_total // 2 + 1, max_total)},
    }
    profiles = []
    for name in PROFILE_NAMES:
        profile = {}
        for binding in manifest.targets["trt"].inputs:
            shapes = [tuple(d if isinstance(d, int) else ranges[name][d][i] for d in binding["shape"])
                      for i in range(3)]
            profile[binding["name"]] = (shapes[0], shapes[1], shapes[2])
        profiles.append(profile)
    return profiles


def profile_for_past(past_length: int) -> int:
    """Which profile serves a call with this many past tokens."""
    return 0 if past_length == 0 else 1


def require_tensorrt():
    """Import TensorRT or say exactly what is missing."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise MixexportError("TensorRT is not installed: on a machine with an NVIDIA GPU run "
                             "pip install 'mixexport[trt]' (TensorRT >= 10)") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise MixexportError(f"TensorRT {trt.__version__} is too old: the MixtralMoE plugin is an IPluginV3 "
                             f"and the build uses strongly typed networks, which need TensorRT >= 10")
    return trt


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def keyed_timing_cache(path: str | Path, tensorrt_version: str, gpu: str, compute_capability: tuple[int, int]) -> Path:
    """The timing cache file for one GPU model and TensorRT version, beside `path`.

    TensorRT's timings are only valid for the GPU and the TensorRT release that measured them; a
    cache shared across either would feed one build the other's tactics.

    Args:
        path: the cache location the user named, e.g. ~/.cache/mixexport/tensorrt.timing.cache.
        tensorrt_version: tensorrt.__version__.
        gpu: the device name, e.g. "NVIDIA H200".
        compute_capability: (major, minor).

    Returns:
        e.g. ~/.cache/mixexport/tensorrt.timing-trt10.8.0-nvidia-h200-sm90.cache
    """
    path = Path(path)
    slug = re.sub(r"[^a-z0-9.]+", "-", f"trt{tensorrt_version}-{gpu}".lower()).strip("-")
    major, minor = compute_capability
    return path.with_name(f"{path.stem}-{slug}-sm{major}{minor}{path.suffix}")


def load_plugin_library(trt, library: Path) -> None:
    """Load the plugin library into this process and check that TensorRT now finds its creator.

    Raises:
        MixexportError: when the library does not load, or loads without registering MixtralMoE
            under the contract's namespace (e.g. a library built for another TensorRT major, which
            refuses to register and says so on stderr).
    """
    from mixexport.targets.trt.contract import plugin_contract

    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        raise MixexportError(f"cannot load the plugin library {library}: {exc}") from None
    contract = plugin_contract()
    name, version, namespace = contract["op_type"], contract["plugin_version"], contract["plugin_namespace"]
    if trt.get_plugin_registry().get_creator(name, version, namespace) is None:
        raise MixexportError(f"{library} loaded but TensorRT {trt.__version__} has no plugin {namespace}::{name} "
                             f"version {version}; rebuild it against this TensorRT "
                             f"(cmake -DTensorRT_ROOT=...) and see its message above")


def write_buffer(path: Path, buffer) -> None:
    """Write a buffer (TensorRT's IHostMemory) to `path` without copying it into a Python bytes
    object (a Mixtral 8x7B engine is about 90 GB), through a temporary file renamed into place."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(memoryview(buffer))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def find_plugin_library(explicit: str | Path | None = None) -> Path:
    """The plugin library: --plugin, $MIXEXPORT_PLUGIN_LIB, or ./build/plugins/moe/ (the CMake default)."""
    candidates = [explicit, os.environ.get(PLUGIN_ENV), Path("build/plugins/moe") / PLUGIN_LIBRARY]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    raise MixexportError(f"the MixtralMoE plugin library {PLUGIN_LIBRARY} was not found; build it with "
                         f"cmake -S . -B build -DTensorRT_ROOT=/path/to/TensorRT && cmake --build build -j, "
                         f"then pass --plugin build/plugins/moe/{PLUGIN_LIBRARY} (or set {PLUGIN_ENV})")


def finish_instructions(out: Path, with_kernels: bool) -> list[str]:
    """What to run on a GPU machine to turn OUT/trt into an engine (`with_kernels`: OUT/trt/kernels
    holds AOT-compiled kernels the plugin build can embed instead of compiling its own)."""
    aot = f" -DMIXEXPORT_AOT_DIR={out / 'trt' / 'kernels'}" if with_kernels else ""
    return [
        "pip install -e '.[trt]'    # TensorRT >= 10 and onnxruntime-gpu",
        f"cmake -S . -B build -DTensorRT_ROOT=/path/to/TensorRT{aot} && cmake --build build -j",
        f"mixexport engine {out} --plugin build/plugins/moe/{PLUGIN_LIBRARY}",
    ]


def build_engine(out: str | Path, manifest: Any, record: Callable[[Path], dict],
                 plugin: str | Path | None = None, timing_cache: str | Path | None = DEFAULT_TIMING_CACHE,
                 progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Build OUT/trt/model.engine with both profiles and copy the plugin library beside it.

    Args:
        record: a written file -> its manifest file entry (the artifact format's).

    Returns:
        the manifest entry describing the engine (also to be stored under targets.trt.engine).
    """
    trt = require_tensorrt()
    gpu = gpu_name()
    if gpu is None:
        raise MixexportError("building a TensorRT engine needs an NVIDIA GPU; none is visible to CUDA here")
    import torch
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    out = Path(out)
    library = find_plugin_library(plugin)
    load_plugin_library(trt, library)
    folder = out / "trt"
    onnx_path = folder / "model.onnx"
    profiles = []
    for shapes in optimization_profiles(manifest):
        profile = Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        profiles.append(profile)
    cache = None
    if timing_cache:
        cache = keyed_timing_cache(timing_cache, trt.__version__, gpu, torch.cuda.get_device_capability(0))
        cache.parent.mkdir(parents=True, exist_ok=True)
    # Precision comes from the graph's dtypes: a strongly typed network (TensorRT 11 has no other
    # kind; on TensorRT 10 the fp16/bf16 builder flags would let TensorRT pick precisions itself).
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = CreateConfig(profiles=profiles, load_timing_cache=str(cache) if cache else None)
    progress(f"building the TensorRT {trt.__version__} engine on {gpu} (2 profiles)")
    serialized = EngineBytesFromNetwork(network, config, save_timing_cache=str(cache) if cache else None)()
    write_buffer(folder / ENGINE_FILE, serialized)
    del serialized  # the engine's host copy: as large as the engine
    shutil.copy2(library, folder / PLUGIN_LIBRARY)
    return {
        "file": f"trt/{ENGINE_FILE}",
        "files": [record(folder / name) for name in (ENGINE_FILE, PLUGIN_LIBRARY)],
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "timing_cache": str(cache) if cache else None,
        "profiles": [{"name": name, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}
                     for name, shapes in zip(PROFILE_NAMES, optimization_profiles(manifest))],
        "plugin": PLUGIN_LIBRARY,
    }
