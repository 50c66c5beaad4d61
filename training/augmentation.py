"""Random image augmentation for the training input pipeline only.

It lives outside the model because tf2onnx cannot convert Keras's random ops and they have no
place at inference: the saved model never sees it. Augmented batches stay uint8, exactly the
kind of input the model takes in serving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import TrainingError

if TYPE_CHECKING:
    import tensorflow as tf

FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")


@dataclass
class Augmentation:
    """What varies between epochs; all zero (the default) means no augmentation."""

    shift: float = 0.0  # largest translation, as a fraction of height and width
    rotation: float = 0.0  # largest rotation, in degrees
    zoom: float = 0.0  # largest zoom in or out, as a fraction
    flip: str = "none"  # one of FLIPS
    contrast: float = 0.0  # largest contrast change, as a fraction

    def __post_init__(self) -> None:
        if self.flip not in FLIPS:
            raise TrainingError(f"flip must be one of {', '.join(FLIPS)}, not {self.flip!r}")
        for name in ("shift", "zoom", "contrast"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainingError(f"{name} is a fraction between 0 and 1, not {getattr(self, name)}")
        if not 0 <= self.rotation <= 180:
            raise TrainingError(f"rotation is in degrees between 0 and 180, not {self.rotation}")

    @property
    def enabled(self) -> bool:
        return bool(self.shift or self.rotation or self.zoom or self.contrast or self.flip != "none")

    def describe(self) -> str:
        """A short text for the training log, e.g. "shift 0.1, rotation 20, flip horizontal"."""
        if not self.enabled:
            return "none"
        parts = [f"{k} {v:g}" for k, v in asdict(self).items() if k != "flip" and v]
        if self.flip != "none":
            parts.append(f"flip {self.flip}")
        return ", ".join(parts)


def augmenter(augmentation: Augmentation, seed: int) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """A function from a uint8 image batch to a randomly transformed uint8 batch, or None when nothing varies."""
    if not augmentation.enabled:
        return None
    import keras
    import tensorflow as tf
    from keras import layers

    steps = []
    if augmentation.flip != "none":
        steps.append(layers.RandomFlip(augmentation.flip, seed=seed))
    if augmentation.shift:
        steps.append(layers.RandomTranslation(augmentation.shift, augmentation.shift, fill_mode="nearest", seed=seed + 1))
    if augmentation.rotation:
        steps.append(layers.RandomRotation(augmentation.rotation / 360.0, fill_mode="nearest", seed=seed + 2))
    if augmentation.zoom:
        steps.append(layers.RandomZoom(augmentation.zoom, fill_mode="nearest", seed=seed + 3))
    if augmentation.contrast:
        steps.append(layers.RandomContrast(augmentation.contrast, seed=seed + 4))
    block = keras.Sequential(steps, name="augmentation")

    def apply(images: tf.Tensor) -> tf.Tensor:
        out = block(tf.cast(images, tf.float32), training=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    return apply
