"""What an export starts from: a training run folder, or a saved Keras model with its labels, plus held-out images."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kos_core.artifact import InputSpec
from kos_core.layout import RUN_FILE, TEST_SPLIT_FILE
from kos_core.layout import RUN_MODEL_FILE as MODEL_FILE

from .errors import ExportError


@dataclass
class Images:
    """Held-out images as the model takes them (uint8 NHWC), with their class indices when known."""

    x: np.ndarray
    y: np.ndarray | None
    origin: str


@dataclass
class Source:
    """A trained Keras model and everything the metadata needs to describe it."""

    model: object
    labels: list[str]
    input_shape: tuple[int, int, int]
    color_mode: str
    resize_method: str
    architecture: str
    dataset: str
    source_run: str
    metrics: dict[str, float] = field(default_factory=dict)
    held_out: Images | None = None
    training_config: dict = field(default_factory=dict)  # the run's config, to reload its training images


def read_labels(path: Path) -> list[str]:
    """Labels from a JSON list, a run.json-like object with "labels", or a text file with one label a line."""
    if not path.is_file():
        raise ExportError(f"labels file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExportError(f"labels file {path} is not valid JSON: {exc}") from None
        labels = data.get("labels") if isinstance(data, dict) else data
        if not isinstance(labels, list) or not all(isinstance(label, (str, int)) for label in labels):
            raise ExportError(f"labels file {path} holds no list of labels (a JSON list, or an object with a 'labels' list)")
        labels = [str(label) for label in labels]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) < 2:
        raise ExportError(f"labels file {path} names {len(labels)} class(es); a classifier needs at least 2")
    if len(set(labels)) != len(labels):
        raise ExportError(f"labels file {path} repeats a label")
    return labels


def _load_keras(path: Path):
    import keras

    try:
        return keras.models.load_model(path)
    except Exception as exc:  # Keras raises many kinds for a file it cannot read.
        raise ExportError(f"cannot load the Keras model {path}: {exc}") from None


def model_input_shape(model) -> tuple[int, int, int]:
    """H, W, C of the model's image input; anything else is refused with the shape it has."""
    if len(model.inputs) != 1:
        raise ExportError(f"the model has {len(model.inputs)} inputs; an image classifier takes one image batch")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] not in (1, 3) or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        raise ExportError(
            f"the model's input {shape} is not an image: expected (batch, height, width, channels) of fixed size with 1 or 3 channels"
        )
    return shape[1], shape[2], shape[3]  # type: ignore[return-value]


def load_run(run_dir: Path) -> Source:
    """A training run folder: model.keras, run.json and the held-out test split."""
    if not run_dir.exists():
        raise ExportError(f"{run_dir} does not exist")
    for required in (MODEL_FILE, RUN_FILE, TEST_SPLIT_FILE):
        if not (run_dir / required).is_file():
            raise ExportError(f"{run_dir} is not a training run folder: {required} is missing")
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
        labels, color_mode = [str(label) for label in record["labels"]], record["color_mode"]
        architecture, dataset = record["config"]["model"], record["dataset"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExportError(f"{run_dir / RUN_FILE} is not a run record: {exc!r}") from None
    model = _load_keras(run_dir / MODEL_FILE)
    shape = model_input_shape(model)
    if list(shape) != list(record.get("input_shape", shape)):
        raise ExportError(f"the run records input {record['input_shape']} but its model takes {list(shape)}")
    with np.load(run_dir / TEST_SPLIT_FILE) as split:
        held_out = Images(np.asarray(split["x"], np.uint8), np.asarray(split["y"], np.int64), f"{run_dir / TEST_SPLIT_FILE}")
    return Source(
        model=model,
        labels=labels,
        input_shape=shape,
        color_mode=color_mode,
        resize_method=record.get("resize_method", "bilinear"),
        architecture=architecture,
        dataset=dataset,
        source_run=str(run_dir),
        metrics={k: float(v) for k, v in record.get("metrics", {}).items()},
        held_out=held_out,
        training_config=dict(record["config"]),
    )


def load_keras_file(
    model_file: Path, labels_file: Path | None, dataset: str = "unknown", resize_method: str = "bilinear"
) -> Source:
    """A saved Keras model and its labels; H, W, C come from the model and the colour mode from C."""
    if not model_file.is_file():
        raise ExportError(f"{model_file} does not exist")
    if labels_file is None:
        raise ExportError(f"{model_file} is a Keras model file: give its class labels with --labels FILE")
    labels = read_labels(labels_file)
    model = _load_keras(model_file)
    shape = model_input_shape(model)
    return Source(
        model=model,
        labels=labels,
        input_shape=shape,
        color_mode="grayscale" if shape[2] == 1 else "rgb",
        resize_method=resize_method,
        architecture=getattr(model, "name", None) or model_file.stem,
        dataset=dataset,
        source_run=str(model_file),
    )


def load_source(
    path: Path, labels_file: Path | None = None, dataset: str | None = None, resize_method: str | None = None
) -> Source:
    """A run folder or a `.keras` file, whichever `path` is."""
    if path.is_dir():
        if labels_file is not None:
            raise ExportError("--labels is for a Keras model file; a run folder carries its labels in run.json")
        return load_run(path)
    if path.suffix in {".keras", ".h5"}:
        return load_keras_file(path, labels_file, dataset or "unknown", resize_method or "bilinear")
    if not path.exists():
        raise ExportError(f"{path} does not exist: give a training run folder or a saved Keras model (.keras)")
    raise ExportError(f"{path} is neither a training run folder nor a saved Keras model (.keras)")


def load_image_folder(folder: Path, source: Source, limit: int | None = None) -> Images:
    """Images from a folder, decoded to the model's H×W×C by the service's own decoder.

    Class subfolders named after the labels give each image its class; a flat folder gives none.
    Files that do not decode are skipped with a notice, as training skips them; none decoding is an error.
    """
    from kos_core.errors import ImageError
    from kos_core.imagefolder import IMAGE_SUFFIXES, decode_file, image_files

    if not folder.is_dir():
        raise ExportError(f"image folder {folder} does not exist")
    entries: list[tuple[Path, int | None]] = []
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subfolders:
        unknown = [p.name for p in subfolders if p.name not in source.labels]
        if unknown:
            raise ExportError(f"image folder {folder} has class folders {unknown} that are not labels of the model")
        for sub in subfolders:
            index = source.labels.index(sub.name)
            entries += [(p, index) for p in image_files(sub)]
    else:
        entries = [(p, None) for p in image_files(folder, recursive=False)]
    if not entries:
        raise ExportError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if limit is not None:
        # Spread the sample over all classes rather than taking the first folder's images.
        entries = [entries[i] for i in np.linspace(0, len(entries) - 1, min(limit, len(entries))).astype(int)]
    height, width, _ = source.input_shape
    spec = InputSpec(height, width, source.color_mode, source.resize_method)  # type: ignore[arg-type]
    decoded, skipped = [], []
    for path, label in entries:
        try:
            decoded.append((decode_file(path, spec), label))
        except (ImageError, OSError) as exc:
            skipped.append(f"{path.relative_to(folder)}: {exc}")
    if not decoded:
        raise ExportError(f"none of the {len(entries)} image files in {folder} could be decoded (first: {skipped[0]})")
    if skipped:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        print(f"skipped {len(skipped)} unreadable image file(s) in {folder}: {skipped[0]}{more}", file=sys.stderr)
    x = np.stack([image for image, _ in decoded])
    y = None if decoded[0][1] is None else np.array([label for _, label in decoded], np.int64)
    return Images(x, y, str(folder))


def training_images(source: Source, limit: int) -> Images:
    """Calibration images from the run's training split, reloaded the way training loaded it."""
    config = source.training_config
    if not config:
        raise ExportError("int8 calibration needs training images: give a folder of them with --calibration-images")
    try:
        from training.datasets import load_dataset

        size = config.get("image_size")
        data = load_dataset(
            config.get("dataset", source.dataset),
            seed=int(config.get("seed", 0)),
            image_size=tuple(size) if size else None,
            color_mode=config.get("color_mode"),
            validation=config.get("validation"),
            test=config.get("test"),
            progress=False,
            classes=config.get("generated_classes"),
            per_class=config.get("generated_per_class"),
        )
    except Exception as exc:  # unknown data set, or one that cannot be downloaded here
        raise ExportError(
            f"cannot reload the training images of data set {config.get('dataset', source.dataset)!r} for int8 calibration "
            f"({exc}); give a folder of training images with --calibration-images"
        ) from None
    if tuple(data.train.x.shape[1:]) != tuple(source.input_shape):
        raise ExportError(
            f"data set {source.dataset!r} has images {data.train.x.shape[1:]}, the model takes {source.input_shape}"
        )
    rng = np.random.default_rng(int(config.get("seed", 0)))
    pick = np.sort(rng.choice(len(data.train.x), size=min(limit, len(data.train.x)), replace=False))
    return Images(data.train.x[pick], data.train.y[pick], f"{data.name} training split")
