"""Fixtures for the training tests: image folders written with Pillow, in the layout users bring."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Each class is a colour a tiny network tells apart in an epoch or two.
CLASS_COLOURS = {"cloudy": (200, 200, 210), "rainbow": (220, 40, 160), "sandstorm": (200, 150, 60)}


def write_image_folder(
    root: Path, per_class: int = 12, classes: dict[str, tuple[int, int, int]] = CLASS_COLOURS, seed: int = 0
) -> Path:
    """A class-per-folder image set of mixed sizes and formats (PNG, JPEG, BMP), like a downloaded data set."""
    rng = np.random.default_rng(seed)
    formats = ("png", "jpg", "bmp")
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            height, width = int(rng.integers(24, 80)), int(rng.integers(24, 80))
            noise = rng.normal(0, 25, size=(height, width, 3))
            pixels = np.clip(np.asarray(colour, dtype=float) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{name}_{i:03d}.{formats[i % len(formats)]}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of 12 images each."""
    return write_image_folder(tmp_path / "weather")


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Write an image folder with chosen classes and sizes under a fresh path."""
    count = iter(range(1000))

    def make(per_class: int = 12, classes: dict[str, tuple[int, int, int]] = CLASS_COLOURS, seed: int = 0) -> Path:
        return write_image_folder(tmp_path / f"images{next(count)}", per_class, classes, seed)

    return make
