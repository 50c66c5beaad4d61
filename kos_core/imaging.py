"""Image bytes to the uint8 HxWxC array a model takes: decode, orient, convert, resize.

Training, export and the service all decode through `decode_image`, so a model sees the same
pixels in training as in serving. A plain JPEG (the usual upload) is decoded by libjpeg-turbo
through simplejpeg, without Pillow's Python around it, where that gives Pillow's very pixels
(`_jpeg_direct`); every other file goes through Pillow. Blocking and CPU-bound: the service calls
it in a thread pool, never on the event loop (both decoders release the GIL while they decode).
Errors are the core's own (UnsupportedImage, ImageTooLarge); each front end maps them to its answers.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings

import numpy as np
import PIL
from PIL import Image, ImageOps

try:
    import simplejpeg
except ImportError:  # Pillow decodes everything
    simplejpeg = None

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

log = logging.getLogger(__name__)


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


# A plain JPEG's colour space (its header, as libjpeg-turbo reads it) and the model's colour mode →
# what libjpeg-turbo is asked for, where that is exactly what Pillow's decode and convert give. A
# colour JPEG for a greyscale model is not here: Pillow makes its grey from RGB, not from Y.
_DIRECT_JPEG = {("YCbCr", "rgb"): "RGB", ("RGB", "rgb"): "RGB", ("Gray", "rgb"): "RGB", ("Gray", "grayscale"): "GRAY"}


# Segments before the first scan that the direct path takes: the baseline, extended and progressive
# frame headers, Huffman and quantisation tables, the restart interval, comments and a JFIF APP0.
# Any other (EXIF or XMP in APP1, which may rotate the image; ICC, Adobe, Photoshop, restart or
# TEM markers; arithmetic or lossless frames) sends the file to Pillow, whose parser reads more
# of the headers than libjpeg does and refuses some files that libjpeg decodes.
_PLAIN_SEGMENTS = frozenset({0xC0, 0xC1, 0xC2, 0xC4, 0xDB, 0xDD, 0xFE, 0xE0})


def _whole_tables(payload: bytes) -> bool:
    """Whether a DQT segment holds whole tables (8- or 16-bit), as Pillow's parser demands."""
    while payload:
        size = 1 + 64 * (1 if payload[0] >> 4 == 0 else 2)
        if len(payload) < size:
            return False
        payload = payload[size:]
    return True


def _plain_headers(data: bytes) -> bool:
    """Whether every segment of a JPEG before its first scan is one of `_PLAIN_SEGMENTS`, well formed.

    Well formed where Pillow's parser reads it: its length within the file, a JFIF APP0 of full
    length, a frame header of at least 6 bytes, quantisation tables whole.
    """
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the headers are over
            return True
        if marker not in _PLAIN_SEGMENTS:
            return False
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        payload = data[i + 4 : i + 2 + length]
        if length < 2 or len(payload) != length - 2:
            return False
        if marker == 0xE0 and not (payload.startswith(b"JFIF\x00") and len(payload) >= 14):
            return False
        if marker in (0xC0, 0xC1, 0xC2) and len(payload) < 6:
            return False
        if marker == 0xDB and not _whole_tables(payload):
            return False
        i += 2 + length
    return False


def _jpeg_direct(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray | None:
    """A plain JPEG decoded by libjpeg-turbo without Pillow's Python around it; None: Pillow decodes it.

    Plain: only the segments `_plain_headers` takes (so no EXIF rotation), a colour space in
    `_DIRECT_JPEG`, small enough that Pillow would decode it at full scale (no draft), within the
    pixel limits, and no libjpeg warning (simplejpeg's strict mode). Pillow and simplejpeg both run
    libjpeg-turbo with the accurate DCT and smooth chroma upsampling; `direct_jpeg_agrees` checks
    that the pixels match.
    """
    if simplejpeg is None or not data.startswith(b"\xff\xd8\xff") or not _plain_headers(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except MemoryError:
        raise
    except Exception:  # ValueError, or a KeyError for a chroma layout it has no name for (4:4:1): Pillow's turn
        return None
    side = DRAFT_MARGIN * max(spec.width, spec.height)
    if min(width // side, height // side) >= 2 or width * height > max_pixels:
        return None
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None
    target = _DIRECT_JPEG.get((colorspace, spec.color_mode))
    if target is None or not direct_jpeg_agrees():
        return None
    try:
        array = simplejpeg.decode_jpeg(data, colorspace=target)
    except MemoryError:
        raise
    except Exception:
        return None
    if array.shape[:2] == (spec.height, spec.width):
        return np.asarray(array if array.ndim == 3 else array[:, :, None], dtype=np.uint8)
    # Resized by Pillow, as every other image is (2-D uint8 is Pillow's L, H x W x 3 its RGB).
    return _fit(Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array), spec)


@functools.cache
def direct_jpeg_agrees() -> bool:
    """Whether libjpeg-turbo called directly gives Pillow's pixels, on JPEGs of every layout (once per process).

    Pillow and simplejpeg each bundle their own libjpeg-turbo; should two builds ever disagree,
    every JPEG goes through Pillow, so that serving sees the pixels training saw.
    """
    if simplejpeg is None:
        return False
    rng = np.random.default_rng(0)
    cases: list[tuple[str, tuple[int, int], dict[str, int | bool]]] = [
        ("RGB", (33, 17), {"subsampling": 0}),  # 4:4:4
        ("RGB", (32, 32), {"subsampling": 1}),  # 4:2:2
        ("RGB", (31, 45), {"subsampling": 2}),  # 4:2:0
        ("RGB", (40, 24), {"progressive": True}),
        ("RGB", (24, 24), {"optimize": True, "quality": 60}),
        ("L", (19, 23), {}),
    ]
    for mode, (width, height), options in cases:
        shape = (height, width, 3) if mode == "RGB" else (height, width)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode=mode).save(buffer, format="JPEG", **options)
        with Image.open(io.BytesIO(buffer.getvalue())) as image:
            expected = np.asarray(image.convert("RGB"))
            expected_grey = np.asarray(image.convert("L")) if mode == "L" else None
        try:
            got = simplejpeg.decode_jpeg(buffer.getvalue(), colorspace="RGB")
            got_grey = simplejpeg.decode_jpeg(buffer.getvalue(), colorspace="GRAY") if mode == "L" else None
        except MemoryError:
            raise
        except Exception:  # whatever it raises, it did not give Pillow's pixels
            got, got_grey = None, None
        if (
            got is None
            or not np.array_equal(got, expected)
            or (expected_grey is not None and (got_grey is None or not np.array_equal(got_grey[:, :, 0], expected_grey)))
        ):
            log.warning(
                "simplejpeg %s decodes JPEGs differently from Pillow %s here: every JPEG is decoded by Pillow",
                simplejpeg.__version__,
                PIL.__version__,
            )
            return False
    return True


def jpeg_decoder() -> str:
    """Which decoder plain JPEGs go through in this process, in words (runs the check once)."""
    if direct_jpeg_agrees():
        return f"libjpeg-turbo through simplejpeg {simplejpeg.__version__}, checked to give Pillow {PIL.__version__}'s pixels"
    return f"Pillow {PIL.__version__}" + ("" if simplejpeg is not None else " (simplejpeg is not installed)")


def decode_image(data: bytes, filename: str, spec: InputSpec, max_pixels: int, *, direct_jpeg: bool = True) -> np.ndarray:
    """Decode one image into a uint8 array of shape (H, W, C) for `spec`; raises an ImageError.

    `direct_jpeg=False`: Pillow decodes a plain JPEG too (the same pixels, more Python per image).
    A MemoryError is not the file's fault and passes through unchanged.
    """
    direct = _jpeg_direct(data, spec, max_pixels) if direct_jpeg else None
    if direct is not None:
        return direct
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
