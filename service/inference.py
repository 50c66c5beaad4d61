"""The logic behind /predict: decode uploads off the event loop, batch them, shape top-k answers."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from kos_core import errors as core_errors
from kos_core.artifact import InputSpec
from kos_core.imaging import decode_image

from .batcher import BatcherClosed
from .errors import DeadlineExceeded, ImageTooLarge, InferenceFailed, UnsupportedImage
from .registry import Registry, ServedModel
from .schemas import ClassScore, Prediction, PredictResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


def decode(upload: Upload, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """decode_image, with the core's errors as the HTTP errors they are (413, 415)."""
    try:
        return decode_image(upload.data, upload.filename, spec, max_pixels)
    except core_errors.ImageTooLarge as exc:
        raise ImageTooLarge(str(exc)) from None
    except core_errors.UnsupportedImage as exc:
        raise UnsupportedImage(str(exc)) from None


def top_k_scores(probabilities: np.ndarray, labels: list[str], k: int) -> list[ClassScore]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [ClassScore(label=labels[i], index=int(i), probability=float(probabilities[i])) for i in order]


async def _predict_once(
    served: ServedModel, uploads: list[Upload], top_k: int, max_pixels: int, deadline: float, decoder: Executor
) -> PredictResponse:
    assert served.metadata is not None and served.batcher is not None
    meta, spec, batcher = served.metadata, served.metadata.input_spec, served.batcher
    loop = asyncio.get_running_loop()
    if len(uploads) == 1 and batcher.idle():
        # Nothing to batch with: decode and run in one trip to the inference thread.
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                "the request's deadline passed before its image ran (its upload took that long); nothing was run"
            )
        upload = uploads[0]
        probabilities = await batcher.run_alone(lambda: decode(upload, spec, max_pixels)[None])
    else:
        announcement = batcher.announce(len(uploads))
        try:
            # Every file is decoded before anything is queued, so a bad file fails the request without running the model.
            images = await asyncio.gather(*(loop.run_in_executor(decoder, decode, u, spec, max_pixels) for u in uploads))
            probabilities = await batcher.submit(np.stack(images), deadline, announcement)
        finally:
            announcement.withdraw()
    broken = ~np.isfinite(probabilities).all(axis=1)
    if broken.any():
        # NaN or infinity is the model's failure on these images (an overflow, say), not an answer.
        names = ", ".join(u.filename for u, bad in zip(uploads, broken) if bad)
        log.error("model %s v%d returned non-finite probabilities for %s", served.name, served.version, names)
        raise InferenceFailed(
            f"model {served.name!r} version {served.version} returned non-finite probabilities (NaN or infinity) for {names}"
        )
    k = min(top_k, len(meta.labels))
    predictions = []
    for upload, row in zip(uploads, probabilities):
        scores = top_k_scores(row, meta.labels, k)
        predictions.append(
            Prediction(filename=upload.filename, label=scores[0].label, probability=scores[0].probability, top_k=scores)
        )
    return PredictResponse(model=served.name, version=served.version, predictions=predictions)


async def predict(
    registry: Registry,
    name: str,
    version: int | None,
    uploads: list[Upload],
    top_k: int,
    max_pixels: int,
    deadline: float,
    decoder: Executor,
) -> PredictResponse:
    """Classify `uploads` with the requested model version; raises a ServiceError the client can act on."""
    served = registry.get(name, version)
    try:
        return await _predict_once(served, uploads, top_k, max_pixels, deadline, decoder)
    except BatcherClosed:
        # The version was swapped for a newer file while this request was decoding: the new one serves it.
        return await _predict_once(registry.get(name, version), uploads, top_k, max_pixels, deadline, decoder)
