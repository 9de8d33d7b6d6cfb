"""The `ort` target: onnxruntime's fused contrib and opset-23 ops."""
