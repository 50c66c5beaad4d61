"""The logic behind /predict: decode uploads off the event loop, run the model, shape top-k answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from .imaging import decode_image
from .registry import ServedModel
from .schemas import ClassScore, Prediction, PredictResponse


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


def top_k_scores(probabilities: np.ndarray, labels: list[str], k: int) -> list[ClassScore]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [ClassScore(label=labels[i], index=int(i), probability=float(probabilities[i])) for i in order]


async def predict(served: ServedModel, uploads: list[Upload], top_k: int, max_pixels: int) -> PredictResponse:
    spec = served.metadata
    assert spec is not None
    # Every file is decoded before anything runs, so a bad file fails the request without running the model.
    images = await asyncio.gather(
        *(asyncio.to_thread(decode_image, u.data, u.filename, spec, max_pixels) for u in uploads)
    )
    probabilities = await asyncio.to_thread(served.run, np.stack(images))
    k = min(top_k, len(spec.labels))
    predictions = []
    for upload, row in zip(uploads, probabilities):
        scores = top_k_scores(row, spec.labels, k)
        predictions.append(
            Prediction(filename=upload.filename, label=scores[0].label, probability=scores[0].probability, top_k=scores)
        )
    return PredictResponse(model=served.name, version=served.version, predictions=predictions)
