"""mixexport: export Mixtral-family MoE checkpoints to ONNX and TensorRT, with parity validation."""

__version__ = "0.1.0"
