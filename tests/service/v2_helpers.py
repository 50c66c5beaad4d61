"""What the v2 tests share: images, /predict's answers as probability vectors, the image-client preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from kos_core.artifact import InputSpec
from kos_core.imaging import decode_image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "digits"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Float noise: the same image through the same session may land in batches of other sizes.
ATOL = 1e-5


def example_digits() -> list[tuple[str, int, bytes]]:
    """The bundled example digits: (file name, true label, PNG bytes)."""
    return [(f"{w}.png", i, (EXAMPLES / f"{w}.png").read_bytes()) for i, w in enumerate(WORDS)]


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def upscaled(png: bytes, factor: int = 8) -> bytes:
    """A larger PNG of the same digit, so that a client-side (or server-side) resize really resizes."""
    image = Image.open(io.BytesIO(png))
    buffer = io.BytesIO()
    image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def digits_spec() -> InputSpec:
    return InputSpec(height=8, width=8, color_mode="grayscale", resize_method="bilinear")


def decoded(data: bytes, name: str = "x.png") -> np.ndarray:
    """The uint8 [H, W, C] array the service decodes `data` to (the shared core's decoder)."""
    return decode_image(data, name, digits_spec(), 40_000_000)


def predict_probabilities(url: str, files: list[tuple[str, bytes]], model: str = "digits", classes: int = 10) -> np.ndarray:
    """What POST /predict answers for `files`, as a [batch, classes] probability array."""
    response = httpx.post(
        f"{url}/predict/{model}?top_k={classes}", files=[("files", (name, data)) for name, data in files], timeout=60
    )
    response.raise_for_status()
    out = np.zeros((len(files), classes), dtype=np.float32)
    for row, prediction in enumerate(response.json()["predictions"]):
        for score in prediction["top_k"]:
            out[row, score["index"]] = score["probability"]
    return out


def image_client_preprocess(data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """What Triton's image-classification example client does to a file before sending it: colour, resize, NHWC."""
    image = Image.open(io.BytesIO(data))
    image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array
