"""Image bytes to the uint8 HxWxC array a model takes: decode, orient, convert, resize.

Training, export and the service all decode through `decode_image`, so a model sees the same
pixels in training as in serving. Blocking and CPU-bound: the service calls it in a thread pool,
never on the event loop (Pillow releases the GIL while it decodes and resizes). Errors are the
core's own (UnsupportedImage, ImageTooLarge); each front end maps them to its answers.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from .artifact import InputSpec
from .errors import ImageError, ImageTooLarge, UnsupportedImage

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow's name for a JPEG that carries further images after the first (Multi-Picture Format, what
# many cameras and phones write): its first image is an ordinary JPEG, decoded as one.
JPEG_FORMATS = ("JPEG", "MPO")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# A JPEG is decoded at 1/2, 1/4 or 1/8 scale only while that keeps at least this many times the
# model's input size, so the final resize still sees more pixels than it writes.
DRAFT_MARGIN = 2


def allow_images_up_to(max_pixels: int) -> None:
    """Make `max_pixels` the limit that governs, for the whole process.

    Pillow has a decompression-bomb limit of its own (about 179 M pixels, and a warning from half
    that), checked while the header is read, before `decode_image` checks `max_pixels`; a service
    configured for larger images would otherwise still refuse them. Pillow's limit is only ever
    raised here, never lowered, and its warning is silenced: `decode_image` refuses what is over.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _to_mode(image: Image.Image, color_mode: str) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: keep the top 8 bits instead of clipping everything above 255 to white.
        array = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in image.info:
        # Transparent pixels are composited onto white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    # CMYK, YCbCr, LAB, HSV, 1, L and RGB all have Pillow conversions to L and RGB.
    return image.convert("L" if color_mode == "grayscale" else "RGB")


def image_pixels(data: bytes, filename: str) -> int:
    """Width x height of an encoded image, from its header alone; raises UnsupportedImage."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{filename}: image is too large to decode safely") from exc
    except Exception as exc:
        raise UnsupportedImage(f"{filename}: not a readable image ({type(exc).__name__})") from exc


def decode_image(data: bytes, filename: str, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Decode one image into a uint8 array of shape (H, W, C) for `spec`; raises an ImageError.

    A MemoryError is not the file's fault and passes through unchanged.
    """
    try:
        # open() reads the header only: the size is checked before a single pixel is decoded.
        image: Image.Image = Image.open(io.BytesIO(data))
        if image.format not in SUPPORTED_FORMATS and image.format not in JPEG_FORMATS:
            raise UnsupportedImage(
                f"{filename}: {image.format} images are not supported; send one of {', '.join(SUPPORTED_FORMATS)}"
            )
        if image.width * image.height > max_pixels:
            raise ImageTooLarge(f"{filename}: {image.width}x{image.height} pixels is more than the limit of {max_pixels}")
        if image.format in JPEG_FORMATS:
            # Decode large JPEGs at a reduced scale when the model input is much smaller. The longer
            # side is used for both, so an EXIF rotation afterwards cannot leave a side too small.
            side = DRAFT_MARGIN * max(spec.width, spec.height)
            image.draft(None, (side, side))
        image.seek(0)  # GIF, TIFF, WebP, MPO: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_mode(image, spec.color_mode)
    except (ImageError, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{filename}: image is too large to decode safely") from exc
    except Exception as exc:
        # Everything in this block is Pillow reading untrusted bytes: a malformed file can make it raise
        # almost anything (struct.error, TypeError, ...), and each is the client's bad file, not a server error.
        raise UnsupportedImage(f"{filename}: not a readable image ({type(exc).__name__})") from exc
    return _fit(image, spec)


def convert_array(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 NHWC arrays (a built-in data set) to `spec`, through the same conversion and resize as decoded files."""
    if images.shape[1:] == spec.shape:
        return images
    out = np.empty((len(images), *spec.shape), dtype=np.uint8)
    for i, array in enumerate(images):
        image = Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array, mode="L" if array.shape[-1] == 1 else "RGB")
        out[i] = _fit(_to_mode(image, spec.color_mode), spec)
    return out


def _fit(image: Image.Image, spec: InputSpec) -> np.ndarray:
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), resample=_RESAMPLE[spec.resize_method])
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return array
