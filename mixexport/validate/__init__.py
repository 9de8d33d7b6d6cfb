"""Validation stage: Polygraphy parity of every artifact against the PyTorch reference."""
