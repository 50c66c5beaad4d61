"""The shared core of keras-onnx-serve: the artifact contract, the on-disk layout and the image decoder.

Training, export and the service all import it; it imports none of them, nor FastAPI,
TensorFlow or onnxruntime (tests/test_layers.py and the import-linter contracts enforce it).
"""
