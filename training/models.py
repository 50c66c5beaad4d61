"""The model zoo: each model takes uint8 NHWC images and holds its own preprocessing."""

from __future__ import annotations

from typing import Callable

import keras
from keras import layers


def image_input(input_shape: tuple[int, int, int]) -> keras.KerasTensor:
    return keras.Input(shape=input_shape, dtype="uint8", name="image")


def digits_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """A small CNN for 8x8 greyscale digits: two conv layers, batch norm, dropout."""
    inputs = image_input(input_shape)
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


MODELS: dict[str, Callable[..., keras.Model]] = {"digits_cnn": digits_cnn}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](input_shape, num_classes)
