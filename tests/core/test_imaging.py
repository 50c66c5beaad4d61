"""Decoding uploads: every format and colour mode, EXIF orientation, JPEG draft mode, bomb refusal."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kos_core import imaging
from kos_core.artifact import InputSpec
from kos_core.errors import ImageTooLarge, UnsupportedImage
from kos_core.imaging import DRAFT_MARGIN, decode_image

RGB32 = InputSpec(32, 32, "rgb")
GREY8 = InputSpec(8, 8, "grayscale")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def base_rgb(size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A picture whose halves differ, so orientation and channels matter."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    array[:, : size[0] // 2, 0] = 250
    return Image.fromarray(array, mode="RGB")


def reference(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """What training sees: Keras-style convert then bilinear resize, no aspect preservation."""
    converted = image.convert("L" if spec.color_mode == "grayscale" else "RGB").resize(
        (spec.width, spec.height), Image.Resampling.BILINEAR
    )
    array = np.asarray(converted)
    return array[:, :, None] if array.ndim == 2 else array


@pytest.mark.parametrize(
    "fmt, options", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("JPEG", {"quality": 95})]
)
def test_every_format_decodes_to_what_training_would_see(fmt, options):
    data = encode(base_rgb(), fmt, **options)
    got = decode_image(data, f"x.{fmt.lower()}", RGB32, 10**7)
    expected = reference(Image.open(io.BytesIO(data)), RGB32)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_an_animated_gif_is_read_from_its_first_frame():
    first = base_rgb().quantize(64)
    second = Image.new("RGB", first.size, (0, 0, 255)).quantize(64)
    data = encode(first, "GIF", save_all=True, append_images=[second])
    got = decode_image(data, "anim.gif", RGB32, 10**7)
    np.testing.assert_array_equal(got, reference(first, RGB32))


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "CMYK"])
def test_opaque_colour_modes_convert_like_training(mode):
    image = base_rgb().convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(image, fmt)
    expected = reference(Image.open(io.BytesIO(data)), RGB32)
    np.testing.assert_array_equal(decode_image(data, "x", RGB32, 10**7), expected)
    np.testing.assert_array_equal(decode_image(data, "x", GREY8, 10**7), reference(Image.open(io.BytesIO(data)), GREY8))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_onto_white(mode):
    array = np.zeros((32, 32, 4), dtype=np.uint8)
    array[:, :16] = (200, 0, 0, 255)  # left: opaque red
    array[:, 16:] = (0, 0, 0, 0)  # right: fully transparent black
    image = Image.fromarray(array, mode="RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("RGB").quantize(4)
        image.info["transparency"] = image.getpixel((20, 0))
    data = encode(image, "PNG")
    got = decode_image(data, "alpha.png", RGB32, 10**7)
    assert (got[:, 20:] == 255).all(), "transparent pixels must come out white, not black"
    assert got[:, :10].mean() < 200


def test_16_bit_greyscale_keeps_its_top_8_bits():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    got = decode_image(encode(image, "PNG"), "deep.png", GREY8, 10**7)
    np.testing.assert_array_equal(got[:, :, 0], (ramp >> 8).astype(np.uint8))


def test_exif_orientation_is_applied():
    picture = base_rgb((40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    data = encode(picture, "PNG", exif=exif)
    got = decode_image(data, "phone.png", RGB32, 10**7)
    upright = picture.transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(got, reference(upright, RGB32))
    assert not np.array_equal(got, reference(picture, RGB32))


def test_a_large_jpeg_is_decoded_at_reduced_scale_close_to_a_full_decode():
    big = Image.fromarray(
        np.kron(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((100, 100, 1), dtype=np.uint8))
    )
    data = encode(big, "JPEG", quality=90)  # 4000x3000
    got = decode_image(data, "photo.jpg", RGB32, 10**8)
    draft = Image.open(io.BytesIO(data))
    side = DRAFT_MARGIN * max(RGB32.width, RGB32.height)
    draft.draft(None, (side, side))
    assert draft.size == (500, 375), "Pillow's draft mode decodes this JPEG at 1/8 scale"
    # The decoder's pixels are those of the 1/8-scale decode, not of a full one: it never decoded 12 M pixels.
    np.testing.assert_array_equal(got, reference(draft, RGB32))
    full = reference(Image.open(io.BytesIO(data)), RGB32)
    assert not np.array_equal(got, full)
    assert np.abs(got.astype(int) - full.astype(int)).mean() < 4, "and they stay close to a full decode's"


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: decoding it would need width*height bytes."""
    data = encode(Image.new("L", (4, 4)), "PNG")
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    return data[:8] + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding():
    bomb = _png_claiming(60_000, 60_000)  # 3.6 gigapixels in a few dozen bytes
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match="bomb.png"):
        decode_image(bomb, "bomb.png", GREY8, 40_000_000)
    with pytest.raises(ImageTooLarge, match="2000x1000 pixels is more than the limit of 1000000"):
        decode_image(_png_claiming(2000, 1000), "wide.png", GREY8, 1_000_000)


def test_a_pixel_limit_above_pillows_own_is_the_one_that_governs(monkeypatch):
    from kos_core.imaging import allow_images_up_to

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    allow_images_up_to(200_000_000)
    # Over the limit: refused by the service's own check, which names the size and the limit.
    with pytest.raises(ImageTooLarge, match="15000x14000 pixels is more than the limit of 200000000"):
        decode_image(_png_claiming(15_000, 14_000), "big.png", GREY8, 200_000_000)
    # Under it though above Pillow's default (about 179 M): decoding is attempted; this header's
    # few bytes of pixel data make it an unreadable file, not a refused size.
    with pytest.raises(UnsupportedImage, match="huge.png: not a readable image"):
        decode_image(_png_claiming(14_000, 13_000), "huge.png", GREY8, 200_000_000)
    allow_images_up_to(1_000_000)
    assert Image.MAX_IMAGE_PIXELS == 200_000_000, "a lower limit never lowers Pillow's"


@pytest.mark.parametrize("data", [b"", b"not an image", encode(base_rgb(), "PNG")[:60]])
def test_unreadable_files_are_415_naming_the_file(data):
    with pytest.raises(UnsupportedImage, match="upload.bin"):
        decode_image(data, "upload.bin", RGB32, 10**7)


def test_a_readable_but_unsupported_format_is_415():
    data = encode(base_rgb(), "PPM")
    with pytest.raises(UnsupportedImage, match="PPM images are not supported"):
        decode_image(data, "x.ppm", RGB32, 10**7)


@pytest.mark.parametrize("name", ["mangled_exif.jpeg", "mangled_tags.tiff"])
def test_an_image_whose_tags_crash_the_decoder_is_415_not_500(name):
    # Byte-mutated files found by fuzzing: Pillow raises struct.error / TypeError on them.
    data = (Path(__file__).parent / "data" / name).read_bytes()
    with pytest.raises(UnsupportedImage, match=name):
        decode_image(data, name, RGB32, 10**7)


def test_no_mutation_of_an_images_header_escapes_as_anything_but_a_4xx():
    rng = np.random.default_rng(7)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera"
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, fmt, exif=exif.tobytes())
        original = buffer.getvalue()
        start = max(original.find(b"Exif"), 0)
        for _ in range(150):
            data = bytearray(original)
            for position in rng.integers(start, min(len(data), start + 200), size=rng.integers(1, 5)):
                data[position] = rng.integers(0, 256)
            try:
                decode_image(bytes(data), "fuzzed", RGB32, 10**7)
            except (UnsupportedImage, ImageTooLarge):
                pass


def test_an_mpo_photo_decodes_like_the_jpeg_it_starts_with():
    # Many cameras and phones write Multi-Picture JPEGs; Pillow names them MPO.
    first, second = base_rgb((64, 48)), base_rgb((64, 48)).rotate(90)
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second], quality=95)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    jpeg = encode(first, "JPEG", quality=95)
    np.testing.assert_array_equal(decode_image(data, "phone.jpg", RGB32, 10**7), decode_image(jpeg, "plain.jpg", RGB32, 10**7))


def test_running_out_of_memory_is_not_called_a_bad_file(monkeypatch):
    def exhausted(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", exhausted)  # no real way to exhaust memory in a test
    with pytest.raises(MemoryError):
        decode_image(encode(base_rgb(), "PNG"), "x.png", RGB32, 10**7)


# --- plain JPEGs, decoded by libjpeg-turbo without Pillow's Python --------------------------------


def _pillow_only(monkeypatch, data: bytes, spec: InputSpec) -> np.ndarray:
    pillow = decode_image(data, "x.jpg", spec, 10**8, direct_jpeg=False)
    with monkeypatch.context() as patched:  # and the same when the direct path cannot run at all
        patched.setattr(imaging, "simplejpeg", None)
        np.testing.assert_array_equal(decode_image(data, "x.jpg", spec, 10**8), pillow)
    return pillow


def _smooth(size: tuple[int, int], channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    array = np.cumsum(noise.astype(np.int32), axis=0).astype(np.uint8)  # stripes plus noise: real chroma
    return array[:, :, 0] if channels == 1 else array


@pytest.mark.parametrize(
    ("size", "mode", "options", "spec"),
    [
        ((32, 32), "RGB", {"quality": 90}, RGB32),  # CIFAR-10's own size: no resize
        ((33, 17), "RGB", {"subsampling": 0}, RGB32),  # 4:4:4, resized up
        ((320, 240), "RGB", {"subsampling": 2, "quality": 75}, InputSpec(224, 224, "rgb")),  # 4:2:0 photo
        ((41, 29), "RGB", {"subsampling": 1, "progressive": True}, InputSpec(16, 16, "rgb", "lanczos")),
        ((20, 20), "L", {"quality": 80}, GREY8),  # greyscale file for a greyscale model
        ((30, 20), "L", {}, RGB32),  # greyscale file for a colour model
    ],
)
def test_a_plain_jpeg_is_decoded_directly_into_pillows_very_pixels(monkeypatch, size, mode, options, spec):
    data = encode(Image.fromarray(_smooth(size, 3 if mode == "RGB" else 1)), "JPEG", **options)
    direct = imaging._jpeg_direct(data, spec, 10**8)
    assert direct is not None, "a plain JPEG takes the direct path"
    assert direct.shape == spec.shape and direct.dtype == np.uint8
    np.testing.assert_array_equal(direct, _pillow_only(monkeypatch, data, spec))
    np.testing.assert_array_equal(decode_image(data, "x.jpg", spec, 10**8), direct)


def _cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(_smooth((24, 24))).convert("CMYK"), "JPEG")


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(_smooth((40, 30))), "JPEG", exif=exif)


@pytest.mark.parametrize(
    ("case", "data", "spec"),
    [
        ("an EXIF orientation to apply", _exif_jpeg, RGB32),
        ("a colour JPEG for a greyscale model (Pillow's grey is made from RGB)", lambda: encode(base_rgb(), "JPEG"), GREY8),
        ("a CMYK JPEG", _cmyk_jpeg, RGB32),
        ("big enough for a reduced-scale decode", lambda: encode(Image.fromarray(_smooth((400, 300))), "JPEG"), RGB32),
        ("not a JPEG", lambda: encode(base_rgb(), "PNG"), RGB32),
    ],
)
def test_jpegs_that_need_pillow_go_to_pillow(monkeypatch, case, data, spec):
    encoded = data()
    assert imaging._jpeg_direct(encoded, spec, 10**8) is None, case
    np.testing.assert_array_equal(decode_image(encoded, "x.jpg", spec, 10**8), _pillow_only(monkeypatch, encoded, spec))


def test_the_direct_path_refuses_nothing_pillow_accepts_and_accepts_only_pillows_pixels(monkeypatch):
    rng = np.random.default_rng(11)
    original = encode(Image.fromarray(_smooth((20, 20), seed=3)), "JPEG")
    direct_answers = 0
    for _ in range(300):
        data = bytearray(original)
        for position in rng.integers(0, min(len(data), 400), size=rng.integers(1, 5)):
            data[position] = rng.integers(0, 256)
        direct = imaging._jpeg_direct(bytes(data), RGB32, 10**7)
        if direct is None:
            continue
        direct_answers += 1
        # Whatever the direct path decodes, Pillow decodes too, to the same pixels.
        np.testing.assert_array_equal(direct, _pillow_only(monkeypatch, bytes(data), RGB32))
    assert direct_answers > 50, "mutations of the scan data still take the direct path"


def test_if_the_two_decoders_ever_disagree_every_jpeg_goes_to_pillow(monkeypatch, caplog):
    import simplejpeg

    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda data, **kw: real(data, **kw) ^ 1)  # off by one everywhere
    imaging.direct_jpeg_agrees.cache_clear()
    try:
        assert not imaging.direct_jpeg_agrees()
        assert "every JPEG is decoded by Pillow" in caplog.text
        data = encode(Image.fromarray(_smooth((32, 32))), "JPEG")
        assert imaging._jpeg_direct(data, RGB32, 10**8) is None
        np.testing.assert_array_equal(decode_image(data, "x.jpg", RGB32, 10**8), _pillow_only(monkeypatch, data, RGB32))
    finally:
        imaging.direct_jpeg_agrees.cache_clear()
    monkeypatch.undo()
    assert imaging.direct_jpeg_agrees(), "libjpeg-turbo called directly gives Pillow's pixels here"


def _rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    return exif.tobytes()


_ROTATED = _rotated()  # an APP1 payload: "Exif\0\0" and a TIFF block with one orientation tag


def _with_segment(data: bytes, marker: int, payload: bytes, position: int = 2) -> bytes:
    """`data` with one more segment inserted at byte `position` (after SOI by default)."""
    segment = bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload
    return data[:position] + segment + data[position:]


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("a JFIF APP0 shorter than Pillow reads", lambda d: _with_segment(d, 0xE0, b"JFIF\x00\x01")),
        ("an Adobe APP14 shorter than Pillow reads", lambda d: _with_segment(d, 0xEE, b"Adobe")),
        ("an ICC APP2 shorter than Pillow reads", lambda d: _with_segment(d, 0xE2, b"ICC_PROFILE\x00\x01")),
        ("a Photoshop APP13 Pillow cannot parse", lambda d: _with_segment(d, 0xED, b"Photoshop 3.0\x00" + b"8BIM\x03\xed")),
        ("a TEM marker before the scan", lambda d: d[:2] + b"\xff\x01" + d[2:]),
        ("a restart marker before an EXIF rotation", lambda d: _with_segment(d[:2] + b"\xff\xd0" + d[2:], 0xE1, _ROTATED, 4)),
        ("a quantisation table cut short", lambda d: _with_segment(d, 0xDB, bytes(30))),
        ("a segment running past the end", lambda d: d[:2] + b"\xff\xfe\xff\xff" + b"x" * 10),
    ],
)
def test_headers_pillow_reads_differently_from_libjpeg_go_to_pillow(monkeypatch, case, make):
    plain = encode(Image.fromarray(_smooth((40, 30))), "JPEG")
    data = make(plain)
    assert imaging._jpeg_direct(data, RGB32, 10**8) is None, case
    try:
        expected = decode_image(data, "x.jpg", RGB32, 10**8, direct_jpeg=False)
    except UnsupportedImage:
        with pytest.raises(UnsupportedImage):
            decode_image(data, "x.jpg", RGB32, 10**8)
    else:
        np.testing.assert_array_equal(decode_image(data, "x.jpg", RGB32, 10**8), expected)


def test_anything_the_direct_decoder_raises_hands_the_file_to_pillow(monkeypatch):
    import simplejpeg

    data = encode(Image.fromarray(_smooth((32, 32))), "JPEG")
    expected = decode_image(data, "x.jpg", RGB32, 10**8, direct_jpeg=False)

    def no_name_for_it(*args, **kwargs):
        raise KeyError(6)  # what simplejpeg 1.9 raises for a 4:4:1 JPEG's header

    monkeypatch.setattr(simplejpeg, "decode_jpeg_header", no_name_for_it)
    assert imaging._jpeg_direct(data, RGB32, 10**8) is None
    np.testing.assert_array_equal(decode_image(data, "x.jpg", RGB32, 10**8), expected)

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(simplejpeg, "decode_jpeg_header", exhausted)
    with pytest.raises(MemoryError):  # not the file's fault: never called a bad file
        decode_image(data, "x.jpg", RGB32, 10**8)


def test_the_process_says_which_decoder_serves_plain_jpegs(monkeypatch):
    assert imaging.jpeg_decoder().startswith("libjpeg-turbo through simplejpeg")
    monkeypatch.setattr(imaging, "simplejpeg", None)
    imaging.direct_jpeg_agrees.cache_clear()
    try:
        assert imaging.jpeg_decoder().endswith("(simplejpeg is not installed)")
        assert imaging._jpeg_direct(encode(base_rgb(), "JPEG"), RGB32, 10**8) is None
    finally:
        imaging.direct_jpeg_agrees.cache_clear()
