"""Short real runs end to end: every artefact of the run folder, the training log, evaluation, the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.conftest import ROOT
from training.__main__ import main
from training.augmentation import Augmentation, augmenter
from training.errors import TrainingError
from training.train import MODEL_FILE, RUN_FILE, TEST_SPLIT_FILE, TrainConfig, evaluate, train

RUN_FOLDER = {
    MODEL_FILE,
    RUN_FILE,
    TEST_SPLIT_FILE,
    "labels.txt",
    "history.csv",
    "checkpoint.keras",
    "curves.png",
    "confusion_matrix.png",
    "classification_report.txt",
}


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Two epochs of digits_cnn on scikit-learn's digits, with augmentation on, into a fresh runs/ folder."""
    runs = tmp_path_factory.mktemp("runs")
    config = TrainConfig(epochs=2, augmentation=Augmentation(shift=0.1, rotation=10), note="tiny digits run")
    record = train(config, runs / "digits-tiny")
    return runs / "digits-tiny", record


def test_a_run_writes_every_artefact(digits_run):
    run_dir, _ = digits_run
    assert RUN_FOLDER <= {p.name for p in run_dir.iterdir()}
    for picture in ("curves.png", "confusion_matrix.png"):
        assert (run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    with open(run_dir / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"} <= set(rows[0])
    assert "precision" in (run_dir / "classification_report.txt").read_text()


def test_the_run_record_keeps_what_export_reads(digits_run):
    run_dir, record = digits_run
    on_disk = json.loads((run_dir / RUN_FILE).read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["labels"] == [str(i) for i in range(10)]
    assert on_disk["input_shape"] == [8, 8, 1]
    assert on_disk["color_mode"] == "grayscale" and on_disk["resize_method"] == "bilinear"
    assert on_disk["config"]["model"] == "digits_cnn" and on_disk["dataset"] == "digits"
    metrics = on_disk["metrics"]
    assert set(metrics) >= {"test_loss", "test_accuracy", "test_auc", "test_macro_f1"}
    assert all(isinstance(v, float) for v in metrics.values()), "the ONNX metadata holds metrics as floats"
    assert set(on_disk["per_class"]["3"]) == {"precision", "recall", "f1", "support"}
    assert sum(c["support"] for c in on_disk["per_class"].values()) == 270
    assert np.asarray(on_disk["confusion_matrix"]).sum() == 270
    assert len(on_disk["history"]["loss"]) == on_disk["epochs_run"] == 2
    assert on_disk["config"]["augmentation"] == {"shift": 0.1, "rotation": 10, "zoom": 0.0, "flip": "none", "contrast": 0.0}


def test_the_saved_model_is_the_inference_model_and_scores_as_recorded(digits_run):
    run_dir, record = digits_run
    model = keras.models.load_model(run_dir / MODEL_FILE)
    assert model.inputs[0].dtype == "uint8" and model.layers[0].name == "image"
    assert not [layer.name for layer in _layers(model) if type(layer).__name__.startswith("Random")]
    with np.load(run_dir / TEST_SPLIT_FILE) as split:
        x, y = split["x"], split["y"]
    assert x.dtype == np.uint8 and x.shape == (270, 8, 8, 1)
    accuracy = float((np.asarray(model.predict(x, verbose=0)).argmax(1) == y).mean())
    assert accuracy == pytest.approx(record["metrics"]["test_accuracy"], abs=1e-9)


def test_each_run_appends_a_row_to_the_training_log_and_log_prints_it(digits_run, capsys):
    run_dir, record = digits_run
    ledger = run_dir.parent / "ledger.csv"
    with open(ledger) as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["run"] == "digits-tiny" and row["dataset"] == "digits" and row["split"] == "1257/270/270"
    assert row["image_size"] == "8x8x1" and row["batch_size"] == "32" and row["epochs"] == "2/2"
    assert row["learning_rate"] == "0.001" and row["note"] == "tiny digits run"
    assert row["augmentation"] == "shift 0.1, rotation 10"
    assert float(row["test_accuracy"]) == pytest.approx(record["metrics"]["test_accuracy"], abs=1e-6)
    main(["log", "--ledger", str(ledger)])
    table = capsys.readouterr().out
    header, rule, line = table.splitlines()[:3]
    assert header.split()[:3] == ["finished", "run", "model"] and set(rule) <= {"-", " "}
    assert "digits-tiny" in line and "tiny digits run" in line
    main(["log", "--ledger", str(ledger), "--markdown", "--columns", "run,test_accuracy"])
    assert capsys.readouterr().out.startswith("| run ")


def test_evaluate_reproduces_the_recorded_test_metrics(digits_run):
    run_dir, record = digits_run
    result = evaluate(run_dir)
    assert result["images"] == 270
    for key, value in record["metrics"].items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-5), key
    assert result["per_class"] == record["per_class"]


def test_a_run_folder_is_never_replaced_without_overwrite(digits_run):
    run_dir, _ = digits_run
    before = (run_dir / "run.json").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run.*--overwrite"):
        train(TrainConfig(epochs=1), run_dir)
    assert (run_dir / "run.json").read_bytes() == before


def test_the_same_seed_trains_the_same_model(digits_run, tmp_path):
    _, first = digits_run
    second = train(
        TrainConfig(**{**first["config"], "image_size": None, "augmentation": Augmentation(shift=0.1, rotation=10)}),
        tmp_path / "again",
    )
    timing = ("seconds",)
    assert {k: v for k, v in first["history"].items() if k not in timing} == {
        k: v for k, v in second["history"].items() if k not in timing
    }
    assert first["metrics"] == second["metrics"]


def _backbone_weights_file(path):
    """Weights of a MobileNetV3Small backbone without its top, saved as a user brings pretrained weights offline."""
    keras.utils.set_random_seed(1)
    base = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3), include_preprocessing=True
    )
    base.save_weights(path)
    return path


def test_a_transfer_model_trains_in_two_phases_and_keeps_the_better_one(image_folder, tmp_path, capsys):
    # A learning rate far too high for fine-tuning: phase 2 cannot beat the head alone, so the
    # head-only model from phase 1 must be the one saved.
    weights = _backbone_weights_file(tmp_path / "backbone.weights.h5")
    config = TrainConfig(
        model="mobilenet_v3_small",
        dataset=str(image_folder),
        image_size=(32, 32),
        weights=str(weights),
        epochs=1,
        fine_tune_epochs=1,
        fine_tune_layers=10,
        fine_tune_learning_rate=1e4,
        batch_size=8,
    )
    record = train(config, tmp_path / "run")
    assert [p["name"].split(" ")[0] for p in record["phases"]] == ["head", "fine-tune"]
    head, fine = record["phases"]
    assert fine["learning_rate"] == 1e4 and fine["trainable_weights"] > head["trainable_weights"]
    assert head["kept"] is True and fine["kept"] is False
    assert record["epochs_run"] == 2 and len(record["history"]["loss"]) == 2 and record["epochs_planned"] == 2
    assert head["trained_layers"] == ["probabilities"], "phase 1 trains the head only, the pretrained base frozen"
    assert any(name.startswith("backbone/") for name in fine["trained_layers"])
    assert "plan: up to 2 epochs in all = 1 head (frozen base) + 1 fine-tune" in capsys.readouterr().out
    assert record["dataset"] == "weather" and record["labels"] == ["cloudy", "rainbow", "sandstorm"]
    assert record["input_shape"] == [32, 32, 3] and record["color_mode"] == "rgb"
    assert record["split_sizes"] == {"train": 24, "validation": 6, "test": 6}
    model = keras.models.load_model(tmp_path / "run" / MODEL_FILE)
    head_only = keras.models.load_model(tmp_path / "run" / "checkpoint.keras")
    assert model.get_layer("backbone") is not None
    with np.load(tmp_path / "run" / TEST_SPLIT_FILE) as split:
        np.testing.assert_allclose(model.predict(split["x"], verbose=0), head_only.predict(split["x"], verbose=0), atol=1e-6)


def test_without_pretrained_weights_the_whole_network_trains_in_one_phase(tmp_path, capsys):
    config = TrainConfig(
        model="mobilenet_v3_small",
        dataset="generated",
        image_size=(32, 32),
        generated_classes=3,
        generated_per_class=10,
        weights="none",
        epochs=1,
        batch_size=8,
    )
    record = train(config, tmp_path / "run")
    first_lines = capsys.readouterr().out.splitlines()[:2]
    assert first_lines[0].startswith("mobilenet_v3_small on generated, plan: up to 1 epochs, the whole network trained")
    assert "--weights none: nothing pretrained to freeze; --fine-tune-epochs 10 does not apply" in first_lines[0]
    (phase,) = record["phases"]
    assert phase["name"].startswith("whole network")
    assert phase["trainable_weights"] == record["parameters"]["trainable"]
    backbone = [name for name in phase["trained_layers"] if name.startswith("backbone/")]
    assert len(backbone) > 50 and "probabilities" in phase["trained_layers"]
    assert record["epochs_run"] == record["epochs_planned"] == 1


def test_help_and_first_line_make_a_transfer_run_s_total_epochs_obvious(image_folder, tmp_path):
    help_text = " ".join(_cli("train", "--help").stdout.split())
    assert "--epochs 1 runs up to 11 in all unless --fine-tune-epochs 0" in help_text
    assert "with nothing pretrained the whole network trains" in help_text
    weights = _backbone_weights_file(tmp_path / "backbone.weights.h5")
    config = TrainConfig(
        model="mobilenet_v3_small", dataset=str(image_folder), image_size=(32, 32), weights=str(weights), epochs=1
    )
    assert config.describe_plan(transfer=True).startswith(
        "plan: up to 11 epochs in all = 1 head (frozen base) + 10 fine-tune (top 30 layers of the base)"
    )
    assert TrainConfig(epochs=4).describe_plan(transfer=False).startswith("plan: up to 4 epochs")


def test_a_scratch_model_learns_an_image_folder_with_augmentation(make_image_folder, tmp_path):
    root = make_image_folder(per_class=20)
    config = TrainConfig(
        model="mnist_cnn",
        dataset=str(root),
        color_mode="rgb",
        epochs=4,
        batch_size=8,
        optimizer="sgd",
        learning_rate=0.01,
        augmentation=Augmentation(shift=0.1, rotation=20, flip="horizontal"),
        max_test_images=5,
    )
    record = train(config, tmp_path / "run", ledger=tmp_path / "log.csv")
    # Three flat colours: far better than the one in three of guessing, even after four epochs.
    assert record["metrics"]["test_accuracy"] >= 0.75
    assert record["input_shape"] == [28, 28, 3], "a folder is resized to the model's natural input by default"
    with np.load(tmp_path / "run" / TEST_SPLIT_FILE) as split:
        assert split["x"].shape == (5, 28, 28, 3)
    assert record["test_split_file_images"] == 5 and record["split_sizes"]["test"] == 9
    assert (tmp_path / "log.csv").is_file()


def test_evaluate_scores_a_run_on_a_new_image_folder(image_folder, make_image_folder, tmp_path):
    train(TrainConfig(model="digits_cnn", dataset=str(image_folder), image_size=(8, 8), epochs=1), tmp_path / "run")
    fresh = make_image_folder(per_class=4, seed=7)
    result = evaluate(tmp_path / "run", fresh)
    assert result["images"] == 12 and 0 <= result["metrics"]["test_accuracy"] <= 1
    with pytest.raises(TrainingError, match="classes the model does not know: snow"):
        evaluate(tmp_path / "run", make_image_folder(per_class=3, classes={"cloudy": (1, 1, 1), "snow": (250, 250, 250)}))


def test_augmentation_keeps_uint8_images_of_the_same_shape_and_changes_them():
    import tensorflow as tf

    images = tf.constant(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    augment = augmenter(Augmentation(shift=0.2, rotation=30, zoom=0.1, flip="horizontal", contrast=0.2), seed=0)
    out = augment(images)
    assert out.dtype == tf.uint8 and tuple(out.shape) == (4, 16, 16, 3)
    assert not np.array_equal(out.numpy(), images.numpy())
    assert augmenter(Augmentation(), seed=0) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"optimizer": "adagrad"}, "optimizer must be one of adam, sgd, rmsprop"),
        ({"weights": "coco"}, "weights must be 'imagenet', 'none' or the path of a weights file"),
        ({"generated_classes": 3}, "--generated-classes shapes the generated data set only"),
        ({"model": "alexnet"}, "unknown model 'alexnet'"),
    ],
)
def test_bad_settings_are_refused_before_any_training(tmp_path, changes, message):
    with pytest.raises(TrainingError, match=message):
        train(TrainConfig(**changes), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_augmentation_settings_are_refused():
    with pytest.raises(TrainingError, match="flip must be one of"):
        Augmentation(flip="sideways")
    with pytest.raises(TrainingError, match="shift is a fraction"):
        Augmentation(shift=2)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_help_explains_every_option():
    result = _cli("train", "--help")
    assert result.returncode == 0
    for option in (
        "--model",
        "--dataset",
        "--image-size",
        "--optimizer",
        "--learning-rate",
        "--batch-size",
        "--epochs",
        "--patience",
        "--lr-patience",
        "--shift",
        "--rotation",
        "--flip",
        "--weights",
        "--fine-tune-epochs",
        "--run-dir",
        "--ledger",
        "--note",
        "--seed",
    ):
        assert option in result.stdout
    assert "none" in result.stdout and "imagenet" in result.stdout


def test_cli_refuses_a_single_class_folder_with_a_clear_message(make_image_folder, tmp_path):
    root = make_image_folder(classes={"only": (1, 2, 3)})
    result = _cli("train", "--model", "cifar10_cnn", "--dataset", str(root), "--run-dir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "error:" in result.stderr and "single class" in result.stderr and "Traceback" not in result.stderr


def test_cli_log_without_a_log_says_where_it_looked(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no training log at"):
        main(["log", "--ledger", str(tmp_path / "none.csv")])


def test_a_keras_data_set_that_cannot_download_fails_with_the_offline_way_out(tmp_path):
    # A proxy on a closed port makes the download fail at once; an empty KERAS_HOME holds no cached copy.
    proxy = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path / "keras"),
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "https_proxy": proxy,
        "http_proxy": proxy,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "--model",
            "mnist_cnn",
            "--dataset",
            "mnist",
            "--epochs",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "could not load mnist" in result.stderr and "--dataset digits" in result.stderr, result.stderr[-2000:]
