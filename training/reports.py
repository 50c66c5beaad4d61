"""Test metrics from predictions, and the pictures of a run: learning curves and a confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
REPORT_FILE = "classification_report.txt"


def evaluation_metrics(probabilities: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    """Loss, accuracy, AUC (and top-5 accuracy with many classes) from predicted probabilities."""
    import keras
    from sklearn.metrics import f1_score

    probabilities = np.asarray(probabilities, dtype=np.float32)
    one_hot = np.eye(num_classes, dtype=np.float32)[y]
    predicted = probabilities.argmax(1)
    # The same AUC as the training metric (one-vs-rest, every class's scores pooled).
    auc = keras.metrics.AUC(name="auc")
    auc.update_state(one_hot, probabilities)
    metrics = {
        "test_loss": float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-7, 1.0)))),
        # Accuracy as argmax agreement: what an exported copy of the model will score on the same images.
        "test_accuracy": float(np.mean(predicted == y)),
        "test_auc": float(auc.result()),
        "test_macro_f1": float(f1_score(y, predicted, average="macro", labels=np.arange(num_classes), zero_division=0)),
    }
    if num_classes > 10:
        top5 = np.argsort(-probabilities, axis=1)[:, :5]
        metrics["test_top5_accuracy"] = float(np.mean((top5 == y[:, None]).any(axis=1)))
    return metrics


def per_class_report(probabilities: np.ndarray, y: np.ndarray, labels: list[str]) -> tuple[dict[str, dict[str, float]], str]:
    """Precision, recall, F1 and support per class, as a dict and as sklearn's text table."""
    from sklearn.metrics import classification_report

    predicted = np.asarray(probabilities).argmax(1)
    indices = list(range(len(labels)))
    kwargs = {"labels": indices, "target_names": labels, "zero_division": 0}
    report = classification_report(y, predicted, output_dict=True, **kwargs)
    per_class = {
        label: {
            "precision": float(report[label]["precision"]),
            "recall": float(report[label]["recall"]),
            "f1": float(report[label]["f1-score"]),
            "support": int(report[label]["support"]),
        }
        for label in labels
    }
    return per_class, classification_report(y, predicted, digits=4, **kwargs)


def confusion(probabilities: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y, np.asarray(probabilities).argmax(1), labels=list(range(num_classes)))


def _figure(width: float, height: float):
    # The Agg backend draws to files without a display, on servers and in CI.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def plot_curves(history: dict[str, list[float]], path: Path, title: str, phase_starts: list[int] | None = None) -> Path:
    """Accuracy and loss per epoch, training against validation, side by side."""
    plt, fig = _figure(11, 4.2)
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for position, metric in enumerate(("accuracy", "loss"), start=1):
        ax = fig.add_subplot(1, 2, position)
        for key, style, name in ((metric, "-", "training"), (f"val_{metric}", "--", "validation")):
            if history.get(key):
                ax.plot(epochs, history[key], style, marker="o", markersize=3, label=name)
        for start in phase_starts or []:
            ax.axvline(start + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """The confusion matrix as a heat map of per-class recall, with counts written in when they fit."""
    n = len(labels)
    side = min(24.0, max(5.0, 0.45 * n + 2.5))
    plt, fig = _figure(side, side)
    ax = fig.add_subplot(1, 1, 1)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(n)
    show_labels = n <= 40
    ax.set_xticks(ticks if show_labels else [])
    ax.set_yticks(ticks if show_labels else [])
    if show_labels:
        ax.set_xticklabels(labels, rotation=90 if max(len(label) for label in labels) * n > 40 else 0)
        ax.set_yticklabels(labels)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
