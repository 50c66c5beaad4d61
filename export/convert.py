"""Convert a Keras model to ONNX with tf2onnx, check parity with Keras, write it to the repository."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.artifact import INPUT_NAME, MODEL_FILENAME, OUTPUT_NAME, ModelMetadata, list_versions

OPSET = 17
MAX_PROBABILITY_DIFFERENCE = 1e-4


class ExportError(RuntimeError):
    """The export was refused; nothing was written to the repository."""


@dataclass
class Parity:
    images: int
    max_abs_difference: float
    top1_agreement: float

    @property
    def passed(self) -> bool:
        return self.max_abs_difference <= MAX_PROBABILITY_DIFFERENCE and self.top1_agreement == 1.0

    def as_metadata(self) -> dict[str, float | int | bool]:
        return {
            "images": self.images,
            "max_abs_difference": self.max_abs_difference,
            "top1_agreement": self.top1_agreement,
            "threshold": MAX_PROBABILITY_DIFFERENCE,
            "passed": self.passed,
        }


def to_onnx(model, opset: int = OPSET):
    """The Keras model as an ONNX ModelProto: uint8 NHWC `image` in, float32 `probabilities` out."""
    import tensorflow as tf
    import tf2onnx

    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ExportError(f"the model's input {tuple(shape)} is not an image batch (batch, height, width, 1 or 3)")
    spec = (tf.TensorSpec((None, *shape[1:]), tf.uint8, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(image):
        # training=False: augmentation and dropout are identity at inference and leave the graph.
        return {OUTPUT_NAME: model(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    return proto


def check_parity(model, proto, images: np.ndarray, batch_size: int = 64) -> Parity:
    """Run Keras and onnxruntime on the same images and compare their probabilities."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    worst, agree = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        expected = np.asarray(model(batch, training=False))
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        worst = max(worst, float(np.abs(expected - got).max()))
        agree += int((expected.argmax(1) == got.argmax(1)).sum())
    return Parity(images=len(images), max_abs_difference=worst, top1_agreement=agree / len(images))


def attach_metadata(proto, metadata: ModelMetadata) -> None:
    for key, value in metadata.to_metadata_props().items():
        entry = next((p for p in proto.metadata_props if p.key == key), None) or proto.metadata_props.add()
        entry.key, entry.value = key, value


def next_version(repository: Path, name: str) -> int:
    versions = list_versions(repository, name)
    return (max(versions) + 1) if versions else 1


def write_atomically(proto, repository: Path, name: str, version: int, overwrite: bool = False) -> Path:
    """Write `<repository>/<name>/<version>/model.onnx` so a watcher never sees a partial model.

    The file is written into a hidden temporary folder beside the version folders, which is then
    renamed into place: a rename within one file system is atomic.
    """
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / str(version)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists: choose another version or pass --overwrite")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=folder))
    try:
        path = staging / MODEL_FILENAME
        with open(path, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{version}.old.", dir=folder))
            os.replace(target, retired / "model")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / MODEL_FILENAME


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for package in ("keras-onnx-serve", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime-gpu", "onnxruntime"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def load_run(run_dir: Path) -> tuple[object, dict, np.ndarray]:
    """The trained model, its run record and its held-out test images."""
    import keras

    from training.train import MODEL_FILE, RUN_FILE, TEST_SPLIT_FILE

    for required in (MODEL_FILE, RUN_FILE, TEST_SPLIT_FILE):
        if not (run_dir / required).is_file():
            raise ExportError(f"{run_dir} is not a training run folder: {required} is missing")
    record = json.loads((run_dir / RUN_FILE).read_text())
    model = keras.models.load_model(run_dir / MODEL_FILE)
    with np.load(run_dir / TEST_SPLIT_FILE) as split:
        images = split["x"]
    return model, record, images


def export_run(run_dir: Path, name: str, repository: Path, version: int | None = None, overwrite: bool = False) -> tuple[Path, ModelMetadata]:
    """Convert a run, verify parity on its test split, and write it to the repository."""
    model, record, images = load_run(run_dir)
    proto = to_onnx(model)
    parity = check_parity(model, proto, images)
    if not parity.passed:
        raise ExportError(
            f"parity check failed on {parity.images} images: largest probability difference "
            f"{parity.max_abs_difference:.2e} (limit {MAX_PROBABILITY_DIFFERENCE:.0e}), top-1 agreement "
            f"{parity.top1_agreement:.4f}; nothing was written"
        )
    height, width, channels = record["input_shape"]
    metadata = ModelMetadata(
        name=name,
        labels=record["labels"],
        height=height,
        width=width,
        channels=channels,
        color_mode=record["color_mode"],
        resize_method=record["resize_method"],
        architecture=record["config"]["model"],
        dataset=record["dataset"],
        source_run=str(run_dir),
        metrics=record["metrics"],
        parity=parity.as_metadata(),
        versions=tool_versions(),
    )
    attach_metadata(proto, metadata)
    path = write_atomically(proto, repository, name, version or next_version(repository, name), overwrite)
    return path, metadata
