"""Image bytes to the uint8 HxWxC array a model takes: decode, orient, convert, resize."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .artifact import ModelMetadata
from .errors import ImageTooLarge, UnsupportedImage

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _to_mode(image: Image.Image, color_mode: str) -> Image.Image:
    if image.mode == "P" or image.mode == "LA" or image.mode == "RGBA":
        # Transparent pixels are composited onto white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale: keep the top 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    return image.convert("L" if color_mode == "grayscale" else "RGB")


def decode_image(data: bytes, filename: str, spec: ModelMetadata, max_pixels: int) -> np.ndarray:
    """Decode one upload into a uint8 array of shape (H, W, C) for `spec`; raises a 4xx ServiceError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in SUPPORTED_FORMATS:
                raise UnsupportedImage(f"{filename}: {image.format} images are not supported; send one of {', '.join(SUPPORTED_FORMATS)}")
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(f"{filename}: {image.width}x{image.height} pixels is more than the limit of {max_pixels}")
            if image.format == "JPEG":
                # Decode large JPEGs at a reduced scale when the model input is much smaller.
                image.draft("L" if spec.color_mode == "grayscale" else "RGB", (spec.width, spec.height))
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise ImageTooLarge(f"{filename}: image is too large to decode safely") from exc
        raise UnsupportedImage(f"{filename}: not a readable image ({type(exc).__name__})") from exc
    image = _to_mode(image, spec.color_mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), resample=_RESAMPLE[spec.resize_method])
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return array
