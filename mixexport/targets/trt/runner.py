"""A Polygraphy runner for the trt engine that picks the optimization profile per call.

Prefill feeds (past length 0) run in profile 0 ("context"), decode feeds in profile 1
("generation"). Needs TensorRT, a GPU and the plugin library; imported only where they exist.
"""

from __future__ import annotations

from pathlib import Path

from mixexport import graph_io
from mixexport.targets.trt.engine import PLUGIN_LIBRARY, profile_for_past, require_tensorrt


def engine_runner(out: Path, name: str = "trt-engine"):
    """A Polygraphy TrtRunner over OUT's engine with the bundled plugin library loaded."""
    require_tensorrt()
    from polygraphy.backend.trt import EngineFromBytes, LoadPlugins, TrtRunner

    folder = out / "trt"
    engine = EngineFromBytes(LoadPlugins(plugins=[str(folder / PLUGIN_LIBRARY)],
                                         obj=lambda: (folder / "model.engine").read_bytes()))

    class ProfileSwitchingTrtRunner(TrtRunner):
        active_profile = 0

        def infer_impl(self, feed_dict, *args, **kwargs):
            profile = profile_for_past(feed_dict[graph_io.past_names(0)[0]].shape[2])
            if profile != self.active_profile:
                self.set_profile(profile)
                self.active_profile = profile
            return super().infer_impl(feed_dict, *args, **kwargs)

    return ProfileSwitchingTrtRunner(engine, name=name, optimization_profile=0)
