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
    assert "2 scale-and-shift pairs written as BatchNormalization: batch_normalization, batch_normalization_1" in exported.stdout
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


def _untrained_mobilenet(folder):
    """The issue's model: MobileNetV2 with random, untrained backbone weights, saved as a user would save it."""
    import keras

    from training.models import build_model

    keras.utils.set_random_seed(0)
    build_model("mobilenet_v2", (32, 32, 3), 3, weights="none").save(folder / "model.keras")
    (folder / "labels.txt").write_text("a\nb\nc\n")
    rng = np.random.default_rng(0)
    for label in "abc":
        (folder / "images" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB").save(folder / "images" / label / f"{i}.png")
    return folder


def _export_untrained(folder, repository, *more):
    return _run(
        str(folder / "model.keras"), "--labels", str(folder / "labels.txt"), "--images", str(folder / "images"),
        "--name", "random", "--repository", str(repository), *more,
    )  # fmt: skip


def test_a_model_whose_output_ignores_its_input_is_refused_unless_asked_and_then_marked_inconclusive(tmp_path):
    folder, repository = _untrained_mobilenet(tmp_path), tmp_path / "models"
    refused = _export_untrained(folder, repository)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "parity inconclusive: the model's output does not depend on its input" in refused.stderr
    assert "--allow-inconclusive-parity" in refused.stderr and "nothing was written" in refused.stderr
    assert not repository.exists()

    allowed = _export_untrained(folder, repository, "--allow-inconclusive-parity")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "parity inconclusive" in allowed.stderr, "the export's own output says so"
    assert "parity     inconclusive: the model's output does not depend on its input" in allowed.stdout
    meta = read_metadata(repository / "random" / "1" / "model.onnx")
    assert meta.parity["verdict"] == "inconclusive: the model's output does not depend on its input"
    assert meta.parity["agreed"] is True and meta.parity["passed"] is False, "agreement on it proved nothing"
    assert meta.parity["conclusive"] is False and meta.parity["output_spread"] < meta.parity["min_output_spread"]
    shown = _run("show", str(repository / "random"))
    assert "inconclusive" in shown.stdout


def test_a_trained_model_passes_parity_conclusively_with_a_batch_dimension_named_batch(digits_run, tmp_path):
    import onnx

    repository = tmp_path / "models"
    exported = _run(str(digits_run), "--name", "digits", "--repository", str(repository))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "parity     passed on 270 held-out images" in exported.stdout and "inconclusive" not in exported.stdout
    meta = read_metadata(repository / "digits" / "1" / "model.onnx")
    assert meta.parity["verdict"] == "passed" and meta.parity["conclusive"] is True
    assert meta.parity["output_spread"] > 0.5, "a trained classifier's answers move with the image"
    graph = onnx.load(str(repository / "digits" / "1" / "model.onnx")).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "", ""]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # TensorFlow's native start-up lines (cuInit, NodeDef notices) are not in a plain export's output.
    assert not [line for line in exported.stderr.splitlines() if "cuInit" in line or "NodeDef" in line]
