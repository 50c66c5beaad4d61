"""keras-onnx-serve training: Keras image classifiers, data sets, the training loop and its records."""
