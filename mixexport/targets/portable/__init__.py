"""The `portable` target: standard ONNX ops only."""
