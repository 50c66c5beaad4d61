"""Parity: the ONNX file must answer as the Keras model does on held-out images, or it is not written."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME
from kos_core.console import ProgressBar

from .errors import ExportError

if TYPE_CHECKING:
    import keras
    import onnx
    import onnxruntime as ort

MAX_PROBABILITY_DIFFERENCE = 1e-4
# Below this spread of a class's probability across the held-out images, the answers barely depend
# on the image: ten times the parity limit, so agreeing within the limit could not tell such a
# model from a constant.
MIN_OUTPUT_SPREAD = 1e-3
INCONCLUSIVE = "inconclusive: the model's output does not depend on its input"
MAX_ACCURACY_DROP_POINTS = 1.0
BATCH_SIZE = 64


@dataclass
class Parity:
    images: int
    max_abs_difference: float
    top1_agreement: float
    threshold: float = MAX_PROBABILITY_DIFFERENCE
    output_spread: float = float("nan")  # largest range of one class's probability across the images
    min_spread: float = MIN_OUTPUT_SPREAD

    @property
    def passed(self) -> bool:
        return self.max_abs_difference <= self.threshold and self.top1_agreement == 1.0

    @property
    def conclusive(self) -> bool:
        """Whether the images moved the model's answers enough for agreement on them to mean anything."""
        return self.images >= 2 and self.output_spread >= self.min_spread

    @property
    def verdict(self) -> str:
        if not self.passed:
            return "failed"
        return "passed" if self.conclusive else INCONCLUSIVE

    def as_metadata(self) -> dict[str, float | int | bool | str]:
        return {
            "images": self.images,
            "max_abs_difference": self.max_abs_difference,
            "top1_agreement": self.top1_agreement,
            "threshold": self.threshold,
            "output_spread": self.output_spread,
            "min_output_spread": self.min_spread,
            "conclusive": self.conclusive,
            "verdict": self.verdict,
            # Whether the two runtimes agreed within the threshold; "passed" is the verdict, so that a reader
            # of the metadata who looks only at it is not told an inconclusive check passed.
            "agreed": self.passed,
            "passed": self.verdict == "passed",
        }


def output_spread(probabilities: np.ndarray) -> float:
    """How far the held-out images move the answers: the largest range of one class's probability across them."""
    if len(probabilities) < 2:
        return 0.0
    return float((probabilities.max(0) - probabilities.min(0)).max())


def session_for(proto: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU onnxruntime session on an in-memory model: parity is about the graph, not the hardware."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _batches(images: np.ndarray, batch_size: int, show_progress: bool) -> Iterator[np.ndarray]:
    bar = ProgressBar(len(images)) if show_progress else None
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        yield batch
        if bar is not None:
            bar.advance(len(batch))


def onnx_probabilities(
    proto: onnx.ModelProto, images: np.ndarray, batch_size: int = BATCH_SIZE, show_progress: bool = False
) -> np.ndarray:
    session = session_for(proto)
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: b})[0] for b in _batches(images, batch_size, show_progress)])


def keras_probabilities(
    model: keras.Model, images: np.ndarray, batch_size: int = BATCH_SIZE, show_progress: bool = False
) -> np.ndarray:
    # Direct calls in inference mode, as the exported function calls the model.
    return np.concatenate([np.asarray(model(b, training=False)) for b in _batches(images, batch_size, show_progress)])


def check_outputs_are_probabilities(probabilities: np.ndarray, classes: int) -> None:
    """Refuse a model that ends in logits or has a different number of classes than labels."""
    if probabilities.ndim != 2 or probabilities.shape[1] != classes:
        raise ExportError(f"the model answers {probabilities.shape[1:]} per image but there are {classes} labels")
    if (probabilities < -1e-6).any() or not np.allclose(probabilities.sum(1), 1.0, atol=1e-3):
        raise ExportError(
            "the model's outputs are not probabilities (rows must be non-negative and sum to 1): end it with a softmax"
        )


def compare(expected: np.ndarray, got: np.ndarray) -> Parity:
    """Largest probability difference and top-1 agreement between two answers on the same images."""
    if expected.shape != got.shape:
        raise ExportError(f"the ONNX model answers {got.shape}, Keras answers {expected.shape}")
    return Parity(
        images=len(expected),
        max_abs_difference=float(np.abs(expected - got).max()) if len(expected) else 0.0,
        top1_agreement=float((expected.argmax(1) == got.argmax(1)).mean()),
        output_spread=output_spread(expected),
    )


def check_parity(keras_probs: np.ndarray, onnx_probs: np.ndarray, allow_inconclusive: bool = False) -> Parity:
    """Keras's and onnxruntime's answers on the same images; refuse unless within the limit on every image.

    Agreement proves nothing when the answers hardly change from one image to the next (a
    backbone with random weights answers alike for every image): such a parity is inconclusive,
    and refused unless `allow_inconclusive`.
    """
    if len(keras_probs) == 0:
        raise ExportError("parity needs held-out images, and there are none")
    parity = compare(keras_probs, onnx_probs)
    if not parity.passed:
        raise ExportError(
            f"parity check failed on {parity.images} held-out images: largest probability difference "
            f"{parity.max_abs_difference:.2e} (limit {parity.threshold:.0e}), top-1 agreement {parity.top1_agreement:.4f} "
            "(must be 1); nothing was written"
        )
    if not parity.conclusive and not allow_inconclusive:
        how = (
            "a single held-out image cannot show it"
            if parity.images < 2
            else f"across the {parity.images} held-out images no class's probability moves by more than "
            f"{parity.output_spread:.1e} (at least {parity.min_spread:.0e} is needed)"
        )
        raise ExportError(
            f"parity {INCONCLUSIVE}: {how}, so Keras and onnxruntime agreeing on them proves nothing. Is the model "
            "trained (a backbone with random, frozen weights answers alike for every image)? Give more varied held-out "
            "images with --images, or pass --allow-inconclusive-parity to export it anyway; nothing was written"
        )
    return parity


@dataclass
class VariantCheck:
    """A reduced-precision variant's accuracy against the float32 model on the same held-out images."""

    precision: str
    images: int
    accuracy: float
    reference_accuracy: float
    agreement: float
    max_abs_difference: float
    labelled: bool
    forced: bool = False

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.reference_accuracy - self.accuracy)

    @property
    def passed(self) -> bool:
        return self.drop_points <= MAX_ACCURACY_DROP_POINTS

    def as_metadata(self) -> dict[str, float | int | bool | str]:
        return {
            "images": self.images,
            "accuracy": self.accuracy,
            "float32_accuracy": self.reference_accuracy,
            "accuracy_drop_points": self.drop_points,
            "top1_agreement": self.agreement,
            "max_abs_difference": self.max_abs_difference,
            # Without class labels the float32 model's own answers are the truth.
            "against": "labels" if self.labelled else "float32 answers",
            "passed": self.passed,
            "forced": self.forced,
        }


def check_variant(
    precision: str,
    reference: np.ndarray,
    proto: onnx.ModelProto,
    images: np.ndarray,
    y: np.ndarray | None,
    force: bool = False,
    show_progress: bool = False,
) -> VariantCheck:
    """Refuse a variant that loses more than a point of accuracy, unless forced."""
    got = onnx_probabilities(proto, images, show_progress=show_progress)
    truth = reference.argmax(1) if y is None else y
    check = VariantCheck(
        precision=precision,
        images=len(images),
        accuracy=float((got.argmax(1) == truth).mean()),
        reference_accuracy=float((reference.argmax(1) == truth).mean()),
        agreement=float((got.argmax(1) == reference.argmax(1)).mean()),
        max_abs_difference=float(np.abs(got - reference).max()),
        labelled=y is not None,
        forced=force,
    )
    if not check.passed and not force:
        raise ExportError(
            f"the {precision} variant loses {check.drop_points:.2f} points of accuracy on {check.images} held-out images "
            f"({check.accuracy:.4f} against float32's {check.reference_accuracy:.4f}; limit {MAX_ACCURACY_DROP_POINTS} point): "
            "nothing was written; pass --force-variants to keep it anyway"
        )
    return check
