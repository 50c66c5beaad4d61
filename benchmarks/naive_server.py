"""The naive baseline for serve_bench.py: one request, one onnxruntime run, no batching, no limits.

It decodes with the service's own `decode_image` and answers the same JSON shape, so the
benchmark compares the serving architecture, not the image code. `--pillow` decodes every image
with Pillow instead, as a hand-written endpoint would (and as the service's own decoder did before
it read plain JPEGs through libjpeg-turbo directly): the same pixels, more CPU per image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, UploadFile

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from kos_core.imaging import decode_image


def create_naive_app(model_file: Path, intra_op_threads: int = 0, pillow: bool = False) -> FastAPI:
    """A FastAPI app whose sync endpoint decodes and runs each request on its own."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])
    spec = ModelMetadata.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    app = FastAPI()

    @app.post("/predict/{model}")
    def predict(model: str, files: list[UploadFile], top_k: int = 5) -> dict:
        # A plain `def`: Starlette runs it in its thread pool, the common naive pattern.
        images = np.stack(
            [
                decode_image(f.file.read(), f.filename or "file", spec.input_spec, 40_000_000, direct_jpeg=not pillow)
                for f in files
            ]
        )
        probabilities = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        predictions = []
        for f, row in zip(files, probabilities):
            order = np.argsort(-row, kind="stable")[: min(top_k, len(spec.labels))]
            scores = [{"label": spec.labels[i], "index": int(i), "probability": float(row[i])} for i in order]
            predictions.append(
                {"filename": f.filename, "label": scores[0]["label"], "probability": scores[0]["probability"], "top_k": scores}
            )
        return {"model": model, "version": 1, "predictions": predictions}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve one ONNX model the naive way (benchmark baseline).")
    parser.add_argument("model_file", type=Path)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--pillow", action="store_true", help="decode every image with Pillow, as a hand-written endpoint would")
    args = parser.parse_args()
    uvicorn.run(
        create_naive_app(args.model_file, args.intra_op_threads, args.pillow),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
