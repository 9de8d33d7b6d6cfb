"""The `trt` target: the MixtralMoE TensorRT plugin node, its CPU stand-in, kernels and engine."""
