"""Fit a zoo model on a data set and write the run folder."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class TrainConfig:
    model: str = "digits_cnn"
    dataset: str = "digits"
    epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 10
    seed: int = 0


# Files of a run folder, read by `export`.
MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
TEST_SPLIT_FILE = "test_split.npz"


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def train(config: TrainConfig, run_dir: Path) -> dict:
    """Train, evaluate on the held-out test split, and write the run folder; returns the run record."""
    import keras

    from .datasets import load_dataset
    from .models import build_model

    seed_everything(config.seed)
    data = load_dataset(config.dataset, seed=config.seed)
    model = build_model(config.model, data.input_shape, len(data.labels))
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    history = model.fit(
        data.train.x,
        data.train.y,
        validation_data=(data.validation.x, data.validation.y),
        epochs=config.epochs,
        batch_size=config.batch_size,
        callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)],
        verbose=2,
    )
    test_loss, test_accuracy = model.evaluate(data.test.x, data.test.y, verbose=0)
    model.save(run_dir / MODEL_FILE)
    np.savez_compressed(run_dir / TEST_SPLIT_FILE, x=data.test.x, y=data.test.y)
    record = {
        "run": run_dir.name,
        "config": asdict(config),
        "dataset": data.name,
        "labels": data.labels,
        "input_shape": list(data.input_shape),
        "color_mode": data.color_mode,
        "resize_method": data.resize_method,
        "split_sizes": {"train": len(data.train.y), "validation": len(data.validation.y), "test": len(data.test.y)},
        "epochs_run": len(history.history["loss"]),
        "seconds": round(time.time() - started, 1),
        "metrics": {"test_loss": float(test_loss), "test_accuracy": float(test_accuracy)},
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2))
    return record
