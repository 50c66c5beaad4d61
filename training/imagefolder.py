"""Image folders with one sub-folder per class, decoded exactly as the service decodes uploads."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TrainingError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Larger images are skipped as unsafe to decode; far above any photo a data set holds.
MAX_PIXELS = 100_000_000


@dataclass
class FolderImages:
    """Every readable image of a class folder tree, resized to one shape."""

    x: np.ndarray  # uint8, (n, H, W, C)
    y: np.ndarray  # int64 class indices, (n,)
    labels: list[str]
    files: list[str]  # relative paths, parallel to x and y
    skipped: list[str] = field(default_factory=list)  # "path: reason" for files that would not decode


def decode_file(path: Path, size: tuple[int, int], color_mode: str, resize_method: str = "bilinear") -> np.ndarray:
    """One image file to uint8 (H, W, C), through the service's own decoder.

    Sharing `service.imaging.decode_image` (decode, EXIF orientation, colour mode, bilinear resize
    without keeping the aspect ratio) means a model sees exactly the pixels in training that it
    will see in serving; a private copy of those steps would drift.
    """
    from service.artifact import ModelMetadata
    from service.imaging import decode_image

    height, width = size
    spec = ModelMetadata(
        name="training", labels=["0", "1"], height=height, width=width, channels=1 if color_mode == "grayscale" else 3,
        color_mode=color_mode, resize_method=resize_method, architecture="", dataset="",
    )
    return decode_image(path.read_bytes(), path.name, spec, MAX_PIXELS)


def list_class_folders(root: Path) -> dict[str, list[Path]]:
    """Class name to its image files, both sorted so every listing is the same."""
    if not root.exists():
        raise TrainingError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise TrainingError(f"{root} is not a folder; an image data set is a folder with one sub-folder per class")
    classes: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if files:
            classes[folder.name] = files
        else:
            print(f"ignoring class folder {folder.name!r}: it holds no image files ({', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
    if not classes:
        raise TrainingError(
            f"{root} holds no class sub-folders with images ({', '.join(IMAGE_SUFFIXES)}); "
            "lay it out as <root>/<class name>/<image files>"
        )
    if len(classes) < 2:
        only = next(iter(classes))
        raise TrainingError(f"{root} holds a single class ({only!r}); a classifier needs at least two class sub-folders")
    return classes


def load_folder(
    root: Path,
    size: tuple[int, int],
    color_mode: str,
    labels: list[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> FolderImages:
    """Decode every image under `root`; unreadable files are skipped and listed, not fatal.

    `labels` fixes the class order (evaluating a trained model on a new folder); by default the
    sorted sub-folder names are the labels.
    """
    if color_mode not in ("grayscale", "rgb"):
        raise TrainingError(f"colour mode must be 'grayscale' or 'rgb', not {color_mode!r}")
    classes = list_class_folders(root)
    if labels is None:
        labels = list(classes)
    else:
        unknown = sorted(set(classes) - set(labels))
        if unknown:
            raise TrainingError(f"{root} has classes the model does not know: {', '.join(unknown)} (it knows {', '.join(labels)})")
    jobs = [(path, labels.index(name)) for name, paths in classes.items() for path in paths]

    def decode(job: tuple[Path, int]) -> tuple[np.ndarray | None, str]:
        try:
            return decode_file(job[0], size, color_mode), ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this file", with the reason kept
            return None, f"{type(exc).__name__}: {exc}"

    bar = _progress_bar(len(jobs), f"decoding {len(jobs)} images from {root}") if progress else None
    images, targets, files, skipped = [], [], [], []
    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 1)) as pool:
        for (path, target), (array, error) in zip(jobs, pool.map(decode, jobs)):
            relative = str(path.relative_to(root))
            if array is None:
                skipped.append(f"{relative}: {error}")
            else:
                images.append(array)
                targets.append(target)
                files.append(relative)
            if bar is not None:
                bar.add(1)
    if not images:
        raise TrainingError(f"none of the {len(jobs)} image files under {root} could be decoded (first: {skipped[0]})")
    channels = 1 if color_mode == "grayscale" else 3
    x = np.stack(images).reshape(len(images), size[0], size[1], channels)
    return FolderImages(x=x, y=np.asarray(targets, dtype=np.int64), labels=labels, files=files, skipped=skipped)


def _progress_bar(total: int, title: str):
    import sys

    from keras.utils import Progbar

    print(title, file=sys.stderr)
    # A live bar on a terminal; a single line at the end in logs and CI.
    return Progbar(total, unit_name="image", verbose=1 if sys.stdout.isatty() else 2)
