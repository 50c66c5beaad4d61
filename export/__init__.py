"""keras-onnx-serve export: a training run to a verified, self-describing ONNX model in the repository."""
