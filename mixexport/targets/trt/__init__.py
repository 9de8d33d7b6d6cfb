"""TensorRT target: the MixtralMoE plugin contract, and (lazily) engine building."""
