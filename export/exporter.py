"""The export: convert, verify, describe, write. Nothing reaches the repository unless every check passed."""

from __future__ import annotations

import importlib.metadata as md
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from kos_core.artifact import PRECISION_FILENAMES, ModelMetadata

from .convert import OPSET, GraphReport, check_graph, to_onnx
from .errors import ExportError
from .fold import fold_channel_affine
from .parity import (
    INCONCLUSIVE,
    Parity,
    VariantCheck,
    check_outputs_are_probabilities,
    check_parity,
    check_variant,
    keras_probabilities,
    onnx_probabilities,
)
from .repository import attach_metadata, check_name, check_version_free, next_version, write_atomically
from .source import Images, Source, training_images
from .variants import CALIBRATION_IMAGES, VARIANTS, make_variant

TOOLS = ("keras-onnx-serve", "tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter-common", "onnxruntime-gpu", "onnxruntime")


@dataclass
class ExportResult:
    path: Path
    version: int
    metadata: ModelMetadata
    parity: Parity
    graph: GraphReport
    variants: dict[str, VariantCheck] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def tool_versions() -> dict[str, str]:
    """Versions of the exporter and of the frameworks that built the file."""
    versions = {}
    for package in TOOLS:
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export(
    source: Source,
    name: str,
    repository: Path,
    *,
    version: int | None = None,
    overwrite: bool = False,
    images: Images | None = None,
    variants: Sequence[str] = (),
    calibration: np.ndarray | None = None,
    force_variants: bool = False,
    allow_inconclusive_parity: bool = False,
    opset: int = OPSET,
    converter: Callable = to_onnx,
    progress: Callable[[str], None] = _stderr,
    show_progress: bool = False,
) -> ExportResult:
    """Convert `source`, check its graph and its parity on held-out images, build variants, write one new version.

    `images` replaces the run's test split as the held-out set; `calibration` gives int8 its
    training images instead of reloading the run's data set. `progress` hears each step;
    `show_progress` draws progress bars on stderr over the images. A parity whose held-out
    answers do not vary with the image is refused unless `allow_inconclusive_parity`.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ExportError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    check_name(name)
    version = next_version(repository, name) if version is None else version
    # Refuse a taken version before minutes of conversion, and again when writing.
    check_version_free(repository, name, version, overwrite)
    held_out = images if images is not None else source.held_out
    if held_out is None or len(held_out.x) == 0:
        raise ExportError("parity needs held-out images: give a folder of them with --images")
    if tuple(held_out.x.shape[1:]) != tuple(source.input_shape):
        raise ExportError(f"held-out images are {held_out.x.shape[1:]}, the model takes {source.input_shape}")
    described = dict(
        name=name,
        labels=source.labels,
        height=source.input_shape[0],
        width=source.input_shape[1],
        channels=source.input_shape[2],
        color_mode=source.color_mode,
        resize_method=source.resize_method,
        architecture=source.architecture,
        dataset=source.dataset,
        source_run=source.source_run,
    )
    try:
        # What the source says about itself must fit the schema before anything is converted.
        ModelMetadata(**described)
    except ValidationError as exc:
        raise ExportError(f"the source cannot be described for the service: {_first_error(exc)}") from None
    if "int8" in variants and calibration is None:
        # Before minutes of conversion: a run whose training images cannot be reloaded fails now.
        calibration = training_images(source, CALIBRATION_IMAGES).x
    steps = 4 + len(variants)

    progress(f"[1/{steps}] Keras answers {len(held_out.x)} held-out images from {held_out.origin}")
    expected = keras_probabilities(source.model, held_out.x, show_progress=show_progress)
    check_outputs_are_probabilities(expected, len(source.labels))
    metrics = dict(source.metrics)
    if not metrics and held_out.y is not None:
        metrics["test_accuracy"] = float((expected.argmax(1) == held_out.y).mean())

    progress(f"[2/{steps}] converting with tf2onnx (opset {opset}) and checking the graph")
    proto = converter(source.model, opset)
    graph = check_graph(source.model, proto)
    graph.scale_shift_folded = fold_channel_affine(proto)

    progress(f"[3/{steps}] parity: onnxruntime against Keras on the same {len(held_out.x)} images")
    got = onnx_probabilities(proto, held_out.x, show_progress=show_progress)
    parity = check_parity(expected, got, allow_inconclusive=allow_inconclusive_parity)
    if not parity.conclusive:
        progress(f"parity {INCONCLUSIVE} (exported anyway, as --allow-inconclusive-parity asks)")

    checks: dict[str, VariantCheck] = {}
    protos = {"float32": proto}
    for i, precision in enumerate(variants, start=4):
        progress(f"[{i}/{steps}] {precision} variant, checked for accuracy against float32")
        protos[precision] = make_variant(precision, proto, calibration if precision == "int8" else None)
        checks[precision] = check_variant(
            precision, got, protos[precision], held_out.x, held_out.y, force_variants, show_progress
        )

    progress(f"[{steps}/{steps}] writing {repository / name / str(version)}")
    metadata = ModelMetadata(
        **described,
        metrics=metrics,
        parity={**parity.as_metadata(), "images_from": held_out.origin},
        versions=tool_versions(),
        opset=opset,
        graph_checks=graph.as_metadata(),
        variants={p: c.as_metadata() for p, c in checks.items()},
    )
    files = {}
    for precision, variant_proto in protos.items():
        # One creation time for all files of a version.
        attach_metadata(variant_proto, metadata.model_copy(update={"precision": precision}))
        files[PRECISION_FILENAMES[precision]] = variant_proto
    path = write_atomically(files, repository, name, version, overwrite)
    return ExportResult(
        path=path,
        version=version,
        metadata=metadata,
        parity=parity,
        graph=graph,
        variants=checks,
        files={p: path.parent / PRECISION_FILENAMES[p] for p in protos},
    )
