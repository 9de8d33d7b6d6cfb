"""Checkpoint stage: config parsing, lazy safetensors reading, random checkpoint writing."""

from mixexport.checkpoint.config import PRESETS, MixtralConfig, preset
from mixexport.checkpoint.reader import Checkpoint
from mixexport.checkpoint.writer import write_checkpoint

__all__ = ["PRESETS", "Checkpoint", "MixtralConfig", "preset", "write_checkpoint"]
