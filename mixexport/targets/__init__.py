"""Targets: one backend per deployment target, each in its own folder with the same file names
(`backend.py` for what it declares, `lowering.py` for its passes), registered here.

See `mixexport.targets.base.Backend` for the interface; `docs/ARCHITECTURE.md` for where to add one.
"""

from __future__ import annotations

from mixexport.errors import MixexportError
from mixexport.targets.base import Backend
from mixexport.targets.ort.backend import OrtBackend
from mixexport.targets.portable.backend import PortableBackend
from mixexport.targets.trt.backend import TrtBackend

# The registry, in the default build order.
BACKENDS: dict[str, Backend] = {b.name: b for b in (PortableBackend(), OrtBackend(), TrtBackend())}
TARGETS = tuple(BACKENDS)


def backend(name: str) -> Backend:
    """The backend of a target name.

    Raises:
        MixexportError: for an unknown name.
    """
    try:
        return BACKENDS[name]
    except KeyError:
        raise MixexportError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}") from None
