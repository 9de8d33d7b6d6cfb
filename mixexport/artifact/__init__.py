"""Artifact stage: the output directory, its manifest, and writing it atomically."""
