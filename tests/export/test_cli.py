"""`python -m export` as a user runs it: a saved Keras model with labels and an image folder, the card, the errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from export.card import read_metadata
from kos_core.layout import list_models
from tests.conftest import ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _image_folder(folder, x, y, labels, per_class=4):
    """Held-out images as real PNG files in class folders named after the labels."""
    for label_index, label in enumerate(labels):
        (folder / label).mkdir(parents=True)
        for i, image in enumerate(x[y == label_index][:per_class]):
            Image.fromarray(image[:, :, 0], mode="L").save(folder / label / f"{i}.png")
    return folder


def test_a_keras_model_with_labels_and_images_exports_and_show_prints_the_same_card(digits_run, tmp_path):
    labels = [str(i) for i in range(10)]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    with np.load(digits_run / "test_split.npz") as split:
        images = _image_folder(tmp_path / "held_out", split["x"], split["y"], labels)
    (images / "3" / "broken.png").write_bytes(b"\x89PNG not really")  # skipped with a notice, as training does
    repository = tmp_path / "models"

    exported = _run(
        str(digits_run / "model.keras"),
        "--labels",
        str(tmp_path / "labels.txt"),
        "--images",
        str(images),
        "--name",
        "fromfile",
        "--repository",
        str(repository),
        "--dataset",
        "digits",
        "--resize-method",
        "lanczos",
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "[3/4] parity" in exported.stderr
    assert "model card: fromfile v1 (float32)" in exported.stdout
    assert "parity     passed on 40 held-out images" in exported.stdout
    assert "skipped 1 unreadable image file(s)" in exported.stderr and "3/broken.png" in exported.stderr
    assert list_models(repository) == {"fromfile": [1]}
    meta = read_metadata(repository / "fromfile" / "1" / "model.onnx")
    # H, W, C come from the model, the colour mode from C.
    assert (meta.height, meta.width, meta.channels, meta.color_mode) == (8, 8, 1, "grayscale")
    assert meta.resize_method == "lanczos" and meta.dataset == "digits" and meta.labels == labels
    assert meta.source_run == str(digits_run / "model.keras") and meta.parity["images_from"] == str(images)
    assert 0.0 <= meta.metrics["test_accuracy"] <= 1.0

    shown = _run("show", str(repository / "fromfile" / "1"))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() and shown.stdout.strip() in exported.stdout
    latest = _run("show", str(repository / "fromfile"))
    assert latest.stdout == shown.stdout


def test_help_explains_sources_variants_parity_and_show():
    result = _run("--help")
    assert result.returncode == 0
    for needle in (
        "--labels",
        "--images",
        "--variants",
        "--force-variants",
        "--calibration-images",
        "1e-4",
        "python -m export show",
    ):
        assert needle in result.stdout, needle
    assert _run("show", "--help").returncode == 0


def test_cli_errors_are_clear_and_write_nothing(digits_run, tmp_path):
    repository = tmp_path / "models"
    no_labels = _run(str(digits_run / "model.keras"), "--name", "x", "--repository", str(repository))
    assert no_labels.returncode == 1 and "export refused" in no_labels.stderr and "--labels" in no_labels.stderr
    missing = _run(str(tmp_path / "nowhere"), "--name", "x", "--repository", str(repository))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    unknown_variant = _run(str(digits_run), "--name", "x", "--variants", "int4", "--repository", str(repository))
    assert unknown_variant.returncode == 2 and "int4" in unknown_variant.stderr
    not_a_model = _run("show", str(tmp_path / "models" / "nothing"))
    assert not_a_model.returncode == 1 and "is not a repository model" in not_a_model.stderr
    assert not repository.exists()


def test_an_image_folder_in_which_nothing_decodes_is_refused_naming_a_file(tmp_path):
    import pytest

    from export.errors import ExportError
    from export.source import Source, load_image_folder

    source = Source(None, ["a", "b"], (8, 8, 1), "grayscale", "bilinear", "test", "test", "test")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.png").write_bytes(b"not a png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.jpg").write_bytes(b"")
    with pytest.raises(ExportError, match=r"none of the 2 image files .* could be decoded \(first: a/one.png"):
        load_image_folder(tmp_path, source)
    Image.fromarray(np.full((16, 12), 200, np.uint8), mode="L").save(tmp_path / "b" / "three.png")
    images = load_image_folder(tmp_path, source)
    assert images.x.shape == (1, 8, 8, 1) and images.y.tolist() == [1] and (images.x == 200).all()
