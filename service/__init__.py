"""keras-onnx-serve: the async batching model server (never imports TensorFlow)."""
