"""A Polygraphy runner for the trt engine that picks the optimization profile per call.

Prefill feeds (past length 0) run in profile 0 ("context"), decode feeds in profile 1
("generation"). Needs TensorRT, a GPU and the plugin library; imported only where they exist.
"""

from __future__ import annotations

from pathlib import Path

from mixexport import graph_io
from mixexport.targets.trt.engine import (ENGINE_FILE, PLUGIN_LIBRARY, load_plugin_library, profile_for_past,
                                          require_tensorrt)


def engine_runner(out: Path, name: str = "trt-engine"):
    """A Polygraphy TrtRunner over OUT's engine with the bundled plugin library loaded.

    The engine is streamed from its file (TensorRT's IStreamReader), never read into one Python
    bytes object: for Mixtral 8x7B that would be about 90 GB of host memory more.
    """
    trt = require_tensorrt()
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    folder = out / "trt"
    load_plugin_library(trt, folder / PLUGIN_LIBRARY)
    engine = EngineFromPath(str(folder / ENGINE_FILE))

    class ProfileSwitchingTrtRunner(TrtRunner):
        active_profile = 0

        def infer_impl(self, feed_dict, *args, **kwargs):
            profile = profile_for_past(feed_dict[graph_io.past_names(0)[0]].shape[2])
            if profile != self.active_profile:
                self.set_profile(profile)
                self.active_profile = profile
            return super().infer_impl(feed_dict, *args, **kwargs)

    return ProfileSwitchingTrtRunner(engine, name=name, optimization_profile=0)
