"""Data sets as uint8 NHWC arrays with labels, split into train / validation / test."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kos_core.artifact import InputSpec
from kos_core.console import ProgressBar
from kos_core.errors import ImageFolderError
from kos_core.imaging import convert_array

from .errors import TrainingError


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
    source: str = ""  # where the images came from: a package, a download, a folder path
    skipped: list[str] = field(default_factory=list)  # files of an image folder that would not decode

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def split_sizes(self) -> dict[str, int]:
        return {"train": len(self.train.y), "validation": len(self.validation.y), "test": len(self.test.y)}


def stratified_split(x: np.ndarray, y: np.ndarray, validation: float, test: float, seed: int) -> tuple[Split, Split, Split]:
    """Reproducible stratified train / validation / test split."""
    from sklearn.model_selection import train_test_split

    _check_fractions(validation, test)
    _check_class_sizes(y, needed=_least_per_class(validation, test))
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=validation / (1 - test), stratify=y_rest, random_state=seed
    )
    return Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test)


def _check_fractions(validation: float, test: float) -> None:
    if not (0 < validation < 1 and 0 < test < 1 and validation + test < 1):
        raise TrainingError(
            f"validation ({validation}) and test ({test}) fractions must each lie between 0 and 1 and leave images to train on"
        )


def _least_per_class(validation: float, test: float) -> int:
    # A stratified split puts at least one image of every class in each part: three at the very least,
    # more when a part's fraction is small.
    return max(3, int(np.ceil(1 / min(validation, test, 1 - validation - test))))


def _check_class_sizes(y: np.ndarray, needed: int, labels: list[str] | None = None) -> None:
    counts = Counter(int(v) for v in y)
    if labels:
        # A class whose every file failed to decode has no images at all: it must not become a label.
        counts.update({k: 0 for k in range(len(labels)) if k not in counts})
    short = {k: n for k, n in sorted(counts.items()) if n < needed}
    if short:
        name = (lambda k: labels[k]) if labels else str
        listed = ", ".join(f"{name(k)!r} has {n}" for k, n in short.items())
        raise TrainingError(
            f"too few images for a stratified train/validation/test split: {listed}; "
            f"each class needs at least {needed} with these split fractions"
        )


def load_digits(seed: int = 0, validation: float = 0.15, test: float = 0.15, **_: object) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, ships with the package, works offline)."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    # Pixel values are 0..16 ink intensities: scale to the 0..255 of an 8-bit greyscale image.
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    train, val, test_split = stratified_split(x, y, validation, test, seed)
    return Dataset("digits", [str(i) for i in range(10)], train, val, test_split, color_mode="grayscale", source="scikit-learn")


FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_LABELS = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()


def _keras_dataset(name: str, labels: list[str], color_mode: str, fetch: Callable[[], tuple]) -> Callable[..., Dataset]:
    def load(seed: int = 0, validation: float = 0.1, **_: object) -> Dataset:
        try:
            (x_train, y_train), (x_test, y_test) = fetch()
        except Exception as exc:
            raise TrainingError(
                f"could not load {name} through keras.datasets ({exc}); it downloads once into ~/.keras/datasets. "
                "Without internet, train on `--dataset digits` or on an image folder (`--dataset path/to/folder`)"
            ) from exc
        x_train, x_test = (_as_nhwc(x) for x in (x_train, x_test))
        y_train, y_test = (np.asarray(y, dtype=np.int64).reshape(-1) for y in (y_train, y_test))
        # The official test set stays the test set; validation is a stratified slice of training.
        from sklearn.model_selection import train_test_split

        if not 0 < validation < 1:
            raise TrainingError(f"the validation fraction must lie between 0 and 1, not {validation}")
        x_tr, x_val, y_tr, y_val = train_test_split(x_train, y_train, test_size=validation, stratify=y_train, random_state=seed)
        return Dataset(
            name,
            labels,
            Split(x_tr, y_tr),
            Split(x_val, y_val),
            Split(x_test, y_test),
            color_mode=color_mode,
            source=f"keras.datasets.{name}",
        )

    load.__doc__ = f"keras.datasets.{name}: official test set, validation split from training."
    return load


def _as_nhwc(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint8)
    return x[..., None] if x.ndim == 3 else x


def _fetch(module: str, **kwargs: object) -> Callable[[], tuple]:
    def fetch() -> tuple:
        import keras

        return getattr(keras.datasets, module).load_data(**kwargs)

    return fetch


def template_images(shape: tuple[int, int, int], classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated images a small CNN learns in a few epochs: each class a fixed random template under noise.

    For tests and benchmarks where no real data set can be downloaded; `seed` draws the noise and
    the order, the templates are the same for every seed so that splits drawn with other seeds agree.
    """
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(1234).integers(0, 256, (classes, *shape)).astype(np.float32)
    y = np.repeat(np.arange(classes), per_class)
    noise = rng.integers(0, 256, (len(y), *shape)).astype(np.float32)
    x = np.clip(0.75 * templates[y] + 0.25 * noise, 0, 255).astype(np.uint8)
    order = rng.permutation(len(y))
    return x[order], y[order].astype(np.int64)


GENERATED = "generated"
GENERATED_SIZE = (32, 32)
GENERATED_CLASSES = 10
GENERATED_PER_CLASS = 100


def load_generated(
    seed: int = 0,
    validation: float = 0.15,
    test: float = 0.15,
    image_size: tuple[int, int] | None = None,
    color_mode: str | None = None,
    classes: int | None = None,
    per_class: int | None = None,
    **_: object,
) -> Dataset:
    """Class-template images made on the spot (no download): any size, colour mode and class count; learnable in a few epochs."""
    height, width = (int(image_size[0]), int(image_size[1])) if image_size else GENERATED_SIZE
    color_mode = color_mode or "rgb"
    classes = GENERATED_CLASSES if classes is None else int(classes)
    per_class = GENERATED_PER_CLASS if per_class is None else int(per_class)
    if color_mode not in ("grayscale", "rgb"):
        raise TrainingError(f"colour mode must be 'grayscale' or 'rgb', not {color_mode!r}")
    if classes < 2:
        raise TrainingError(f"the generated data set needs at least 2 classes, not {classes}")
    _check_fractions(validation, test)
    needed = _least_per_class(validation, test)
    if per_class < needed:
        raise TrainingError(
            f"the generated data set needs at least {needed} images per class for a stratified split "
            f"with these fractions, not {per_class} (--generated-per-class)"
        )
    channels = 1 if color_mode == "grayscale" else 3
    x, y = template_images((height, width, channels), classes, per_class, seed)
    train, val, test_split = stratified_split(x, y, validation, test, seed)
    return Dataset(
        GENERATED,
        [f"class{i}" for i in range(classes)],
        train,
        val,
        test_split,
        color_mode=color_mode,
        source=f"generated: {classes} class templates under noise, {per_class} images each, {height}x{width} {color_mode}",
    )


def load_image_folder(
    root: Path,
    image_size: tuple[int, int],
    color_mode: str = "rgb",
    seed: int = 0,
    validation: float = 0.15,
    test: float = 0.15,
    progress: bool = True,
    **_: object,
) -> Dataset:
    """An image folder with one sub-folder per class, split stratified and reproducibly by `seed`."""
    from kos_core.imagefolder import list_class_folders, load_folder

    _check_fractions(validation, test)
    spec = InputSpec(int(image_size[0]), int(image_size[1]), color_mode)  # type: ignore[arg-type]
    bar = None
    if progress:
        try:
            count = sum(len(files) for files in list_class_folders(Path(root)).values())
        except ImageFolderError as exc:
            raise TrainingError(str(exc)) from None
        bar = progress_bar(count, f"decoding {count} images from {root}")
    try:
        images = load_folder(Path(root), spec, progress=bar.add if bar is not None else None)
    except ImageFolderError as exc:
        raise TrainingError(str(exc)) from None
    _check_class_sizes(images.y, _least_per_class(validation, test), images.labels)
    train, val, test_split = stratified_split(images.x, images.y, validation, test, seed)
    return Dataset(
        Path(root).resolve().name,
        images.labels,
        train,
        val,
        test_split,
        color_mode=color_mode,
        source=str(Path(root).resolve()),
        skipped=images.skipped,
    )


LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist": _keras_dataset("mnist", [str(i) for i in range(10)], "grayscale", _fetch("mnist")),
    "fashion_mnist": _keras_dataset("fashion_mnist", FASHION_MNIST_LABELS, "grayscale", _fetch("fashion_mnist")),
    "cifar10": _keras_dataset("cifar10", CIFAR10_LABELS, "rgb", _fetch("cifar10")),
    "cifar100": _keras_dataset("cifar100", CIFAR100_LABELS, "rgb", _fetch("cifar100", label_mode="fine")),
    GENERATED: load_generated,
}


def takes_model_size(name: str) -> bool:
    """Whether a data set has no image size of its own (a folder, the generated set): it takes the model's."""
    return name == GENERATED or is_image_folder(name)


def is_image_folder(name: str) -> bool:
    """Whether `--dataset` names a folder on disk rather than a built-in data set."""
    return name not in LOADERS and (Path(name).is_dir() or "/" in name or name.startswith("."))


def load_dataset(
    name: str,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
    color_mode: str | None = None,
    validation: float | None = None,
    test: float | None = None,
    progress: bool = True,
    classes: int | None = None,
    per_class: int | None = None,
) -> Dataset:
    """A built-in data set by name, or an image folder by path; `classes` and `per_class` shape the generated one."""
    fractions = {k: v for k, v in (("validation", validation), ("test", test)) if v is not None}
    if is_image_folder(name):
        if image_size is None:
            raise TrainingError("an image folder needs an image size (`--image-size HxW`)")
        return load_image_folder(Path(name), image_size, color_mode or "rgb", seed=seed, progress=progress, **fractions)
    if name == GENERATED:
        return load_generated(
            seed=seed, image_size=image_size, color_mode=color_mode, classes=classes, per_class=per_class, **fractions
        )
    if name not in LOADERS:
        raise TrainingError(
            f"unknown data set {name!r}; choose one of {', '.join(sorted(LOADERS))}, or give a path to an image folder"
        )
    data = LOADERS[name](seed=seed, **fractions)
    return _adapt(data, image_size, color_mode)


def _adapt(data: Dataset, image_size: tuple[int, int] | None, color_mode: str | None) -> Dataset:
    """Resize or recolour a built-in data set when a model asks for another input (MNIST into a 32x32 RGB backbone)."""
    height, width, channels = data.input_shape
    target_mode = color_mode or data.color_mode
    image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    if image_size in (None, (height, width)) and target_mode == data.color_mode:
        return data
    size = image_size or (height, width)
    # The same conversion and resize as decoded files get, so serving sees what training saw.
    spec = InputSpec(size[0], size[1], target_mode, data.resize_method)  # type: ignore[arg-type]
    for split in (data.train, data.validation, data.test):
        split.x = convert_array(split.x, spec)
    data.color_mode = target_mode
    return data


def progress_bar(total: int, title: str) -> ProgressBar:
    """Progress over decoded files on stderr: a bar on a terminal, a plain line every ten seconds in a log."""
    import sys

    print(title, file=sys.stderr, flush=True)
    return ProgressBar(total, unit="images", title="decoded")
