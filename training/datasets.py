"""Data sets as uint8 NHWC arrays with labels, split into train / validation / test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    x: np.ndarray  # uint8, (n, H, W, C)
    y: np.ndarray  # int64 class indices, (n,)


@dataclass
class Dataset:
    name: str
    labels: list[str]
    train: Split
    validation: Split
    test: Split
    color_mode: str  # "grayscale" or "rgb"
    resize_method: str = "bilinear"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]


def stratified_split(
    x: np.ndarray, y: np.ndarray, validation: float, test: float, seed: int
) -> tuple[Split, Split, Split]:
    """Reproducible stratified train / validation / test split."""
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=validation / (1 - test), stratify=y_rest, random_state=seed
    )
    return Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test)


def load_digits(seed: int = 0, validation: float = 0.15, test: float = 0.15) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, ships with the package, works offline)."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    # Pixel values are 0..16 ink intensities: scale to the 0..255 of an 8-bit greyscale image.
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    train, val, test_split = stratified_split(x, y, validation, test, seed)
    return Dataset("digits", [str(i) for i in range(10)], train, val, test_split, color_mode="grayscale")


LOADERS = {"digits": load_digits}


def load_dataset(name: str, seed: int = 0) -> Dataset:
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(sorted(LOADERS))}")
    return LOADERS[name](seed=seed)
