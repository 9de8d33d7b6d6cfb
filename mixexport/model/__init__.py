"""Reference model stage: the PyTorch decoder and the MoE op reference."""

from mixexport.model.decoder import MixtralDecoder, load_reference, parameter_sources
from mixexport.model.moe import moe_reference, route

__all__ = ["MixtralDecoder", "load_reference", "moe_reference", "parameter_sources", "route"]
