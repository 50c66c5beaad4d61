"""Image folders with one sub-folder per class, decoded exactly as the service decodes uploads.

The one walker of image folders: training reads its data sets through it, export its held-out
and calibration images.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import InputSpec
from .cpus import available_cpus
from .errors import ImageFolderError
from .imaging import decode_image

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


def decode_file(path: Path, spec: InputSpec) -> np.ndarray:
    """One image file to uint8 (H, W, C) for `spec`, through the decoder the service uses for uploads."""
    return decode_image(path.read_bytes(), path.name, spec, MAX_PIXELS)


def image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """The image files in `folder` (and below it), sorted; hidden files are left out."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def list_class_folders(root: Path) -> dict[str, list[Path]]:
    """Class name to its image files, both sorted so every listing is the same."""
    if not root.exists():
        raise ImageFolderError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ImageFolderError(f"{root} is not a folder; an image data set is a folder with one sub-folder per class")
    classes: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = image_files(folder)
        if files:
            classes[folder.name] = files
        else:
            print(
                f"ignoring class folder {folder.name!r}: it holds no image files ({', '.join(IMAGE_SUFFIXES)})", file=sys.stderr
            )
    if not classes:
        raise ImageFolderError(
            f"{root} holds no class sub-folders with images ({', '.join(IMAGE_SUFFIXES)}); "
            "lay it out as <root>/<class name>/<image files>"
        )
    if len(classes) < 2:
        only = next(iter(classes))
        raise ImageFolderError(f"{root} holds a single class ({only!r}); a classifier needs at least two class sub-folders")
    return classes


def load_folder(
    root: Path,
    spec: InputSpec,
    labels: list[str] | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> FolderImages:
    """Decode every image under `root`; unreadable files are skipped and listed, not fatal.

    `labels` fixes the class order (evaluating a trained model on a new folder); by default the
    sorted sub-folder names are the labels. `progress` is called with 1 after each file.
    """
    classes = list_class_folders(root)
    if labels is None:
        labels = list(classes)
    else:
        unknown = sorted(set(classes) - set(labels))
        if unknown:
            raise ImageFolderError(
                f"{root} has classes the model does not know: {', '.join(unknown)} (it knows {', '.join(labels)})"
            )
    jobs = [(path, labels.index(name)) for name, paths in classes.items() for path in paths]

    def decode(job: tuple[Path, int]) -> tuple[np.ndarray | None, str]:
        try:
            return decode_file(job[0], spec), ""
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    images, targets, files, skipped = [], [], [], []
    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=workers or min(8, available_cpus() + 1)) as pool:
        for (path, target), (array, error) in zip(jobs, pool.map(decode, jobs)):
            relative = str(path.relative_to(root))
            if array is None:
                skipped.append(f"{relative}: {error}")
            else:
                images.append(array)
                targets.append(target)
                files.append(relative)
            if progress is not None:
                progress(1)
    if not images:
        raise ImageFolderError(f"none of the {len(jobs)} image files under {root} could be decoded (first: {skipped[0]})")
    x = np.stack(images).reshape(len(images), *spec.shape)
    return FolderImages(x=x, y=np.asarray(targets, dtype=np.int64), labels=labels, files=files, skipped=skipped)
