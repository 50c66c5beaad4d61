"""Data sets: image folders decode like the service, split stratified and reproducibly, and refuse bad data clearly."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from kos_core.artifact import InputSpec
from kos_core.errors import ImageFolderError
from kos_core.imagefolder import decode_file, load_folder
from kos_core.imaging import decode_image
from training.datasets import CIFAR100_LABELS, LOADERS, load_dataset, load_digits, load_image_folder
from training.errors import TrainingError

from .conftest import write_image_folder


def _spec(height: int, width: int, color_mode: str) -> InputSpec:
    return InputSpec(height, width, color_mode)


def _awkward_images(folder):
    """Images that exercise every decoding step: EXIF rotation, transparency, palettes, 16-bit, big JPEGs."""
    rng = np.random.default_rng(1)
    files = []
    photo = Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    path = folder / "rotated.jpg"
    photo.save(path, exif=exif.tobytes())
    files.append(path)
    path = folder / "big.jpg"  # large enough for Pillow's reduced-scale JPEG decoding to kick in
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8), "RGB").save(path, quality=90)
    files.append(path)
    rgba = rng.integers(0, 255, (40, 60, 4), dtype=np.uint8)
    path = folder / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    files.append(path)
    path = folder / "palette.gif"
    photo.convert("P").save(path)
    files.append(path)
    path = folder / "sixteen.png"
    Image.fromarray(rng.integers(0, 65535, (30, 50), dtype=np.uint16)).save(path)
    files.append(path)
    path = folder / "grey.bmp"
    Image.fromarray(rng.integers(0, 255, (33, 17), dtype=np.uint8), "L").save(path)
    files.append(path)
    return files


@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
def test_folder_images_decode_to_the_same_pixels_as_the_service(tmp_path, color_mode):
    for path in _awkward_images(tmp_path):
        ours = decode_file(path, _spec(24, 32, color_mode))
        served = decode_image(path.read_bytes(), path.name, _spec(24, 32, color_mode), max_pixels=40_000_000)
        assert ours.dtype == np.uint8 and ours.shape == served.shape == (24, 32, 1 if color_mode == "grayscale" else 3)
        np.testing.assert_array_equal(ours, served, err_msg=path.name)


def test_folder_labels_are_the_sorted_sub_folders_and_every_image_is_resized(image_folder):
    images = load_folder(image_folder, _spec(20, 30, "rgb"))
    assert images.labels == ["cloudy", "rainbow", "sandstorm"]
    assert images.x.shape == (36, 20, 30, 3) and images.x.dtype == np.uint8
    assert Counter(images.y.tolist()) == {0: 12, 1: 12, 2: 12}
    assert images.skipped == []


def test_grayscale_folder_images_have_one_channel(image_folder):
    images = load_folder(image_folder, _spec(16, 16, "grayscale"))
    assert images.x.shape == (36, 16, 16, 1)


def test_corrupt_files_are_skipped_and_counted_and_other_files_ignored(image_folder):
    (image_folder / "cloudy" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (image_folder / "rainbow" / "empty.png").write_bytes(b"")
    (image_folder / "rainbow" / "notes.txt").write_text("not an image, not counted")
    (image_folder / ".DS_Store").write_bytes(b"\0\0")
    images = load_folder(image_folder, _spec(16, 16, "rgb"))
    assert len(images.y) == 36
    assert sorted(s.split(":")[0] for s in images.skipped) == ["cloudy/broken.jpg", "rainbow/empty.png"]
    data = load_image_folder(image_folder, (16, 16), seed=0, progress=False)
    assert len(data.skipped) == 2


def test_folder_splits_are_stratified_and_reproducible(make_image_folder):
    root = make_image_folder(per_class=20)
    first = load_image_folder(root, (16, 16), seed=3, validation=0.2, test=0.2, progress=False)
    again = load_image_folder(root, (16, 16), seed=3, validation=0.2, test=0.2, progress=False)
    other = load_image_folder(root, (16, 16), seed=4, validation=0.2, test=0.2, progress=False)
    assert first.split_sizes() == {"train": 36, "validation": 12, "test": 12}
    for part in ("train", "validation", "test"):
        a, b = getattr(first, part), getattr(again, part)
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        counts = Counter(a.y.tolist())
        assert len(set(counts.values())) == 1, f"{part} is not stratified: {counts}"
    assert not np.array_equal(first.test.x, other.test.x)
    # No image is in two parts.
    flat = [x.tobytes() for part in (first.train, first.validation, first.test) for x in part.x]
    assert len(set(flat)) == 60


def test_an_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(TrainingError, match="no class sub-folders with images"):
        load_image_folder(tmp_path, (16, 16), progress=False)


def test_a_single_class_folder_is_a_clear_error(make_image_folder):
    root = make_image_folder(classes={"only": (1, 2, 3)})
    with pytest.raises(TrainingError, match="single class .'only'."):
        load_image_folder(root, (16, 16), progress=False)


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"), image_size=(16, 16))


def test_a_class_too_small_to_split_is_named(tmp_path):
    write_image_folder(tmp_path / "set", per_class=12)
    for extra in list((tmp_path / "set" / "rainbow").iterdir())[2:]:
        extra.unlink()
    with pytest.raises(TrainingError, match="'rainbow' has 2"):
        load_image_folder(tmp_path / "set", (16, 16), progress=False)


def test_a_class_whose_every_file_is_corrupt_is_named_not_trained_as_an_empty_label(tmp_path):
    write_image_folder(tmp_path / "set", per_class=12)
    for image in (tmp_path / "set" / "rainbow").iterdir():
        image.write_bytes(b"not an image")
    with pytest.raises(TrainingError, match="'rainbow' has 0"):
        load_image_folder(tmp_path / "set", (16, 16), progress=False)


def test_a_folder_where_nothing_decodes_is_a_clear_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"garbage")
    with pytest.raises(ImageFolderError, match="none of the 2 image files"):
        load_folder(tmp_path, _spec(16, 16, "rgb"))


def test_impossible_split_fractions_are_refused(image_folder):
    with pytest.raises(TrainingError, match="fractions"):
        load_image_folder(image_folder, (16, 16), validation=0.6, test=0.5, progress=False)


def test_digits_split_is_the_one_the_bundled_model_was_tested_on():
    data = load_digits(seed=0)
    assert data.split_sizes() == {"train": 1257, "validation": 270, "test": 270}
    assert data.input_shape == (8, 8, 1) and data.color_mode == "grayscale"
    assert data.train.x.dtype == np.uint8 and data.train.x.max() == 255


def test_unknown_data_set_names_the_choices():
    with pytest.raises(TrainingError, match="cifar10.*digits"):
        load_dataset("imagenet21k")


def test_keras_data_sets_are_all_offered_with_their_labels():
    assert {"mnist", "fashion_mnist", "cifar10", "cifar100", "digits"} <= set(LOADERS)
    assert len(CIFAR100_LABELS) == len(set(CIFAR100_LABELS)) == 100
    assert CIFAR100_LABELS[0] == "apple" and CIFAR100_LABELS[-1] == "worm"


def test_built_in_data_sets_are_resized_and_recoloured_for_a_model_that_needs_it():
    data = load_dataset("digits", image_size=(32, 32), color_mode="rgb")
    assert data.input_shape == (32, 32, 3) and data.color_mode == "rgb"
    assert data.split_sizes()["test"] == 270
    # Greyscale to RGB copies the same value into each channel.
    assert np.array_equal(data.test.x[..., 0], data.test.x[..., 2])


def test_images_with_unknown_content_behind_an_image_suffix_are_skipped(tmp_path):
    write_image_folder(tmp_path / "set", per_class=12)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "ICO")
    (tmp_path / "set" / "cloudy" / "icon.png").write_bytes(buffer.getvalue())
    images = load_folder(tmp_path / "set", _spec(16, 16, "rgb"))
    assert [s.split(":")[0] for s in images.skipped] == ["cloudy/icon.png"]


def test_an_empty_class_folder_is_left_out_with_a_notice(tmp_path, capsys):
    write_image_folder(tmp_path / "set", per_class=12)
    (tmp_path / "set" / "zzz-empty").mkdir()
    data = load_image_folder(tmp_path / "set", (16, 16), progress=False)
    assert "zzz-empty" not in data.labels
    assert "ignoring class folder 'zzz-empty'" in capsys.readouterr().err


@pytest.mark.parametrize(("size", "color_mode", "channels"), [((12, 20), "grayscale", 1), ((40, 40), "rgb", 3)])
def test_the_generated_set_takes_any_size_colour_mode_and_class_count(size, color_mode, channels):
    data = load_dataset("generated", seed=3, image_size=size, color_mode=color_mode, classes=4, per_class=20)
    assert data.input_shape == (*size, channels) and data.color_mode == color_mode
    assert data.labels == ["class0", "class1", "class2", "class3"]
    assert sum(data.split_sizes().values()) == 80 and data.split_sizes()["test"] == 12
    for split in (data.train, data.validation, data.test):
        assert split.x.dtype == np.uint8 and set(split.y.tolist()) == {0, 1, 2, 3}, "stratified: every class in every part"
    assert "4 class templates" in data.source and f"{size[0]}x{size[1]} {color_mode}" in data.source
    again = load_dataset("generated", seed=3, image_size=size, color_mode=color_mode, classes=4, per_class=20)
    assert np.array_equal(again.test.x, data.test.x), "the same seed makes the same images"


def test_the_generated_set_defaults_to_ten_classes_of_32x32_rgb():
    data = load_dataset("generated")
    assert data.input_shape == (32, 32, 3) and len(data.labels) == 10 and sum(data.split_sizes().values()) == 1000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"classes": 1}, "at least 2 classes"),
        ({"per_class": 2}, r"at least 7 images per class .*--generated-per-class"),
        ({"color_mode": "cmyk"}, "colour mode must be 'grayscale' or 'rgb'"),
    ],
)
def test_impossible_generated_sets_are_refused_clearly(options, message):
    with pytest.raises(TrainingError, match=message):
        load_dataset("generated", **options)
