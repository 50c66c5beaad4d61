"""Test metrics, per-class reports, pictures and the training log's table, from known inputs."""

from __future__ import annotations

import numpy as np
import pytest

from training import ledger
from training.errors import TrainingError
from training.reports import confusion, evaluation_metrics, per_class_report, plot_confusion, plot_curves


def _probabilities(predicted: list[int], classes: int, confidence: float = 0.9) -> np.ndarray:
    rest = (1 - confidence) / (classes - 1)
    p = np.full((len(predicted), classes), rest, dtype=np.float32)
    p[np.arange(len(predicted)), predicted] = confidence
    return p


def test_metrics_are_computed_from_the_predictions():
    y = np.array([0, 1, 2, 2])
    p = _probabilities([0, 1, 2, 0], 3)
    metrics = evaluation_metrics(p, y, 3)
    assert metrics["test_accuracy"] == 0.75
    assert metrics["test_loss"] == pytest.approx(-(3 * np.log(0.9) + np.log(0.05)) / 4, rel=1e-5)
    assert 0.5 < metrics["test_auc"] <= 1
    assert "test_top5_accuracy" not in metrics


def test_top5_accuracy_is_reported_with_more_than_ten_classes():
    classes = 20
    y = np.array([3, 7])
    p = np.zeros((2, classes), dtype=np.float32)
    p[0, [3, 1, 2, 4, 5]] = [0.1, 0.3, 0.25, 0.2, 0.15]  # the true class is fifth: a top-5 hit, a top-1 miss
    p[1, [0, 1, 2, 4, 5, 7]] = [0.2, 0.2, 0.2, 0.2, 0.15, 0.05]  # sixth: a miss
    metrics = evaluation_metrics(p, y, classes)
    assert metrics["test_top5_accuracy"] == 0.5 and metrics["test_accuracy"] == 0.0


def test_per_class_report_and_confusion_count_each_class():
    y = np.array([0, 0, 1, 1, 2])
    p = _probabilities([0, 1, 1, 1, 2], 3)
    per_class, text = per_class_report(p, y, ["cat", "dog", "owl"])
    assert per_class["cat"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert per_class["dog"]["precision"] == pytest.approx(2 / 3) and per_class["dog"]["recall"] == 1.0
    assert "owl" in text
    assert confusion(p, y, 3).tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]


def test_pictures_are_png_files(tmp_path):
    history = {"loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6], "accuracy": [0.5, 0.8, 0.9], "val_accuracy": [0.4, 0.7, 0.8]}
    curves = plot_curves(history, tmp_path / "curves.png", "run", phase_starts=[2])
    matrix = plot_confusion(np.array([[3, 1], [0, 4]]), ["a", "b"], tmp_path / "cm.png", "run")
    many = plot_confusion(np.eye(100, dtype=int), [f"c{i}" for i in range(100)], tmp_path / "cm100.png", "run")
    for path in (curves, matrix, many):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_log_sorts_best_first_and_filters(tmp_path):
    path = tmp_path / "ledger.csv"
    for run, accuracy, loss, model in (("a", 0.91, 0.30, "cnn"), ("b", 0.97, 0.10, "cnn"), ("c", 0.95, 0.20, "vgg")):
        ledger.append(path, {"run": run, "model": model, "test_accuracy": accuracy, "test_loss": loss})
    rows = ledger.read(path)
    assert [r["run"] for r in ledger.select(rows, sort="test_accuracy")] == ["b", "c", "a"]
    assert [r["run"] for r in ledger.select(rows, sort="test_loss")] == ["b", "c", "a"]
    assert [r["run"] for r in ledger.select(rows, where={"model": "cnn"})] == ["a", "b"]
    assert [r["run"] for r in ledger.select(rows, last=1)] == ["c"]
    with pytest.raises(TrainingError, match="no column 'speed'"):
        ledger.select(rows, sort="speed")
    table = ledger.format_table(rows, ["run", "test_accuracy"])
    assert table.splitlines()[2].split() == ["a", "0.91"]


def test_a_log_with_older_columns_keeps_its_layout_and_loses_nothing(tmp_path):
    path = tmp_path / "ledger.csv"
    path.write_text("run,note,test_accuracy\nold,,0.5\n")
    ledger.append(path, {"run": "new", "note": "more data", "test_accuracy": 0.9, "test_auc": 0.99})
    rows = ledger.read(path)
    assert list(rows[1]) == ["run", "note", "test_accuracy"]
    assert rows[1]["note"] == "more data [test_auc=0.99]"
