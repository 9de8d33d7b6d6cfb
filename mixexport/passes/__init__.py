"""Graph passes on onnx-ir: lower the captured `mixexport.MoE` nodes per target, clean up, name I/O."""
