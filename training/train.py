"""Fit a zoo model on a data set and write the run folder, then add the run to the training log."""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kos_core.layout import CHECKPOINT_FILE, HISTORY_FILE, LABELS_FILE, RUN_FILE, RUN_MODEL_FILE, TEST_SPLIT_FILE

from .augmentation import Augmentation
from .errors import TrainingError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from .datasets import Dataset, Split

# Files of a run folder: their names are the core's, since `export` reads them.
MODEL_FILE = RUN_MODEL_FILE

OPTIMIZERS = ("adam", "sgd", "rmsprop")


@dataclass
class TrainConfig:
    model: str = "digits_cnn"
    dataset: str = "digits"  # a built-in data set's name, or the path of an image folder
    image_size: tuple[int, int] | None = None  # (H, W); None: the data set's own size, or the model's for a folder
    color_mode: str | None = None  # "grayscale" or "rgb"; None: the data set's own, or the model's for a folder
    validation: float | None = None  # fraction held out for validation; None: the data set's default
    test: float | None = None  # fraction held out for testing (digits and folders; keras.datasets have their own)
    epochs: int = 60
    batch_size: int = 32
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9  # SGD (with Nesterov) and RMSprop
    label_smoothing: float = 0.0
    monitor: str = "val_loss"  # what early stopping, the learning-rate schedule and the checkpoint watch
    patience: int = 10  # epochs without improvement before early stopping
    lr_patience: int = 5  # epochs without improvement before the learning rate drops
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    augmentation: Augmentation = field(default_factory=Augmentation)
    weights: str = "imagenet"  # transfer models: "imagenet", "none" (random: the whole network trains) or a weights file
    dropout: float = 0.2  # transfer models: dropout before the new softmax
    fine_tune_epochs: int = 10  # transfer models: phase 2 epochs with the top of the base unfrozen (0: head only)
    fine_tune_layers: int = 30  # transfer models: how many top layers of the base phase 2 unfreezes
    fine_tune_learning_rate: float | None = None  # phase 2 learning rate; None: a tenth of learning_rate
    seed: int = 0
    deterministic: bool = True  # TensorFlow's deterministic ops: repeatable runs, a little slower on a GPU
    note: str = ""  # free text for the training log: what changed in this run
    max_test_images: int = 2000  # most test images kept in test_split.npz (export's parity check)
    generated_classes: int | None = None  # --dataset generated: classes (None: 10)
    generated_per_class: int | None = None  # --dataset generated: images per class (None: 100)

    @property
    def pretrained(self) -> bool:
        """Whether a transfer model starts from trained weights (ImageNet or a file) that are worth keeping frozen."""
        return self.weights != "none"

    def plan(self, transfer: bool) -> list[tuple[str, int]]:
        """The phases a run goes through and the most epochs of each; their sum is the run's most epochs."""
        if not transfer:
            return [("train", self.epochs)]
        if not self.pretrained:
            return [("whole network (random weights: nothing to transfer)", self.epochs)]
        phases = [("head (frozen base)", self.epochs)]
        if self.fine_tune_epochs > 0:
            phases.append((f"fine-tune (top {self.fine_tune_layers} layers of the base)", self.fine_tune_epochs))
        return phases

    def describe_plan(self, transfer: bool) -> str:
        """One line that says how many epochs the run may take in all, and why."""
        phases = self.plan(transfer)
        total = sum(epochs for _, epochs in phases)
        stop = f"early stopping after {self.patience} without improvement of {self.monitor}"
        if not transfer:
            return f"plan: up to {total} epochs ({stop})"
        if not self.pretrained:
            ignored = f"; --fine-tune-epochs {self.fine_tune_epochs} does not apply" if self.fine_tune_epochs else ""
            return (
                f"plan: up to {total} epochs, the whole network trained from random weights in one phase "
                f"(--weights none: nothing pretrained to freeze{ignored}; {stop})"
            )
        parts = " + ".join(f"{epochs} {name}" for name, epochs in phases)
        skip = "; --fine-tune-epochs 0 trains the head only" if self.fine_tune_epochs else ""
        return f"plan: up to {total} epochs in all = {parts} (--epochs + --fine-tune-epochs{skip}; {stop} in each phase)"

    def check(self) -> None:
        """Refuse settings that cannot train, before any data is loaded."""
        if self.epochs < 1:
            raise TrainingError(f"epochs must be at least 1, not {self.epochs}")
        if self.batch_size < 1:
            raise TrainingError(f"batch size must be at least 1, not {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.learning_rate <= 0:
            raise TrainingError(f"learning rate must be positive, not {self.learning_rate}")
        if self.monitor not in ("val_loss", "val_accuracy", "val_auc"):
            raise TrainingError(f"monitor must be val_loss, val_accuracy or val_auc, not {self.monitor!r}")
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise TrainingError(
                f"weights must be 'imagenet', 'none' or the path of a weights file of the backbone, not {self.weights!r}"
            )
        if self.fine_tune_epochs < 0:
            raise TrainingError(f"fine-tune epochs must be 0 or more, not {self.fine_tune_epochs}")
        if self.color_mode not in (None, "grayscale", "rgb"):
            raise TrainingError(f"colour mode must be 'grayscale' or 'rgb', not {self.color_mode!r}")
        for option, value in (
            ("--generated-classes", self.generated_classes),
            ("--generated-per-class", self.generated_per_class),
        ):
            if value is not None and self.dataset != "generated":
                raise TrainingError(f"{option} shapes the generated data set only (--dataset generated), not {self.dataset!r}")
        if self.max_test_images < 1:
            raise TrainingError("max_test_images must be at least 1: export checks parity on those images")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Same seed, same data split, weights, shuffling and augmentation: with deterministic ops a run repeats exactly."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9) -> keras.optimizers.Optimizer:
    """Adam, SGD with Nesterov momentum, or RMSprop."""
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=True)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, momentum=momentum)
    raise TrainingError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")


def training_metrics(num_classes: int) -> list[keras.metrics.Metric]:
    """Accuracy and AUC, plus top-5 accuracy when there are more than ten classes."""
    import keras

    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")]
    if num_classes > 10:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))
    return metrics


def pipeline(
    split: Split, num_classes: int, batch_size: int, seed: int, training: bool, augmentation: Augmentation | None = None
) -> tf.data.Dataset:
    """Batches of (uint8 images, one-hot labels): shuffled and augmented for training, prefetched always."""
    import tensorflow as tf

    from .augmentation import augmenter

    data = tf.data.Dataset.from_tensor_slices((split.x, split.y))
    if training:
        data = data.shuffle(len(split.y), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    augment = augmenter(augmentation, seed) if (training and augmentation is not None) else None
    if augment is not None:
        data = data.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    data = data.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def _epoch_timer() -> keras.callbacks.Callback:
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Adds each epoch's wall time to the logs, so history and the CSV show training speed."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs is not None:
                logs["seconds"] = time.perf_counter() - self._started

    return EpochTimer()


def _callbacks(config: TrainConfig, run_dir: Path, append_history: bool, best_so_far: float | None) -> list:
    import keras

    mode = "min" if config.monitor == "val_loss" else "max"
    return [
        _epoch_timer(),
        keras.callbacks.EarlyStopping(monitor=config.monitor, mode=mode, patience=config.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(
            monitor=config.monitor, mode=mode, factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
        ),
        keras.callbacks.ModelCheckpoint(
            run_dir / CHECKPOINT_FILE,
            monitor=config.monitor,
            mode=mode,
            save_best_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.CSVLogger(run_dir / HISTORY_FILE, append=append_history),
    ]


def _verbosity() -> int:
    # Keras's live progress bar on a terminal; one line per epoch in logs and CI, where a bar is noise.
    return 1 if sys.stdout.isatty() else 2


def _merge(history: dict[str, list[float]], more: dict[str, list[Any]]) -> None:
    length = len(history.get("loss", []))
    for key, values in more.items():
        history.setdefault(key, [float("nan")] * length).extend(float(v) for v in values)


def build_for(config: TrainConfig, data: Dataset) -> keras.Model:
    """The zoo model for this data set's images and classes."""
    from .models import build_model, zoo

    options: dict[str, object] = {}
    if zoo()[config.model].transfer:
        options = {"weights": config.weights, "dropout": config.dropout}
    return build_model(config.model, data.input_shape, len(data.labels), **options)


def fit(config: TrainConfig, model: keras.Model, data: Dataset, run_dir: Path) -> tuple[dict[str, list[float]], list[dict]]:
    """Train (two phases for a transfer model: head on a frozen base, then the top of the base); returns history and phases."""
    from .models import find_backbone, trained_layers, unfreeze_top

    num_classes = len(data.labels)
    train_data = pipeline(data.train, num_classes, config.batch_size, config.seed, True, config.augmentation)
    val_data = pipeline(data.validation, num_classes, config.batch_size, config.seed, False)
    history: dict[str, list[float]] = {}
    phases: list[dict] = []

    def run_phase(name: str, epochs: int, learning_rate: float, best_so_far: float | None) -> None:
        import keras

        model.compile(
            optimizer=make_optimizer(config.optimizer, learning_rate, config.momentum),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
            metrics=training_metrics(num_classes),
        )
        done = len(history.get("loss", []))
        print(
            f"{name}: up to {epochs} epochs at learning rate {learning_rate:g}, "
            f"{sum(int(np.prod(w.shape)) for w in model.trainable_weights):,} trainable weights",
            flush=True,
        )
        layers_trained = trained_layers(model)
        result = model.fit(
            train_data,
            validation_data=val_data,
            epochs=done + epochs,
            initial_epoch=done,
            shuffle=False,  # the pipeline shuffles, reproducibly from the seed
            callbacks=_callbacks(config, run_dir, append_history=done > 0, best_so_far=best_so_far),
            verbose=_verbosity(),
        )
        _merge(history, result.history)
        phases.append(
            {
                "name": name,
                "first_epoch": done + 1,
                "epochs_run": len(result.history.get("loss", [])),
                "learning_rate": learning_rate,
                "trainable_weights": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
                "trained_layers": layers_trained,
                "kept": True,  # whether the final model holds this phase's best weights
            }
        )

    backbone = find_backbone(model)
    plan = config.plan(transfer=backbone is not None)
    run_phase(plan[0][0], config.epochs, config.learning_rate, None)
    if len(plan) > 1:
        unfrozen = unfreeze_top(model, config.fine_tune_layers)
        pick = min if config.monitor == "val_loss" else max
        best = pick(v for v in history[config.monitor] if v == v)
        run_phase(
            f"fine-tune (top {config.fine_tune_layers} layers of the base: {unfrozen} with weights, batch norm frozen)",
            config.fine_tune_epochs,
            config.fine_tune_learning_rate or config.learning_rate / 10,
            best,
        )
        fine_tuned = history[config.monitor][phases[-1]["first_epoch"] - 1 :]
        improved = any((v < best) if config.monitor == "val_loss" else (v > best) for v in fine_tuned)
        if not improved:
            # Fine-tuning never beat the head alone: early stopping restored phase 2's best, but the
            # checkpoint still holds phase 1's, which is the better model.
            with warnings.catch_warnings():
                # The checkpoint's optimiser belongs to phase 1; only the model's weights are wanted.
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(run_dir / CHECKPOINT_FILE)
            phases[-1]["kept"] = False
            print(f"fine-tuning did not improve {config.monitor} ({best:.4f}): keeping the head-only model", flush=True)
    return history, phases


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for uint8 images, batch by batch."""
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def default_run_dir(config: TrainConfig, root: Path = Path("runs")) -> Path:
    """runs/<model>-<data set>-<UTC time>: unique per run, sorted by time."""
    from .datasets import is_image_folder

    dataset = Path(config.dataset).resolve().name if is_image_folder(config.dataset) else config.dataset
    return root / f"{config.model}-{dataset}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def train(
    config: TrainConfig, run_dir: Path, ledger: Path | None = None, overwrite: bool = False, recipe: dict | None = None
) -> dict:
    """Train, evaluate on the held-out test split, write the run folder and a training-log row; returns the run record.

    `recipe` (name, path, content, overridden) is the recipe file the settings came from, kept in the records.
    """
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        # A run folder is a record the training log and exported models point at: never replace one silently.
        raise TrainingError(f"{run_dir} already holds a run: choose another --run-dir, or pass --overwrite to replace it")
    from . import ledger as training_log
    from .datasets import load_dataset, takes_model_size
    from .models import zoo
    from .reports import (
        CONFUSION_FILE,
        CURVES_FILE,
        REPORT_FILE,
        confusion,
        evaluation_metrics,
        per_class_report,
        plot_confusion,
        plot_curves,
    )

    config.check()
    models = zoo()
    if config.model not in models:
        raise TrainingError(f"unknown model {config.model!r}; choose one of {', '.join(models)}")
    spec = models[config.model]
    # The first lines a run prints: what it trains, on what, and for how many epochs in all.
    if recipe is not None:
        changed = recipe.get("overridden") or {}
        overrides = f", the command line overriding {', '.join(f'{k}={v}' for k, v in changed.items())}" if changed else ""
        print(f"recipe {recipe['name']} ({recipe['path']}){overrides}", flush=True)
    print(f"{config.model} on {config.dataset}, {config.describe_plan(spec.transfer)}", flush=True)
    image_size, color_mode = config.image_size, config.color_mode
    if takes_model_size(config.dataset):
        # A folder or the generated set has no size of its own: the model's natural input unless told otherwise.
        image_size = image_size or spec.default_size
        color_mode = color_mode or spec.default_color_mode

    started = time.time()
    # The split takes its seed explicitly, so the data loads first: a bad folder is refused before TensorFlow starts.
    data = load_dataset(
        config.dataset,
        seed=config.seed,
        image_size=image_size,
        color_mode=color_mode,
        validation=config.validation,
        test=config.test,
        classes=config.generated_classes,
        per_class=config.generated_per_class,
    )
    seed_everything(config.seed, config.deterministic)
    if data.skipped:
        print(f"skipped {len(data.skipped)} unreadable file(s), e.g. {data.skipped[0]}", file=sys.stderr)
    model = build_for(config, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    history, phases = fit(config, model, data, run_dir)

    probabilities = predict(model, data.test.x)
    metrics = evaluation_metrics(probabilities, data.test.y, len(data.labels))
    per_class, report_text = per_class_report(probabilities, data.test.y, data.labels)
    matrix = confusion(probabilities, data.test.y, len(data.labels))

    model.save(run_dir / MODEL_FILE)
    kept = min(len(data.test.y), config.max_test_images)
    np.savez_compressed(run_dir / TEST_SPLIT_FILE, x=data.test.x[:kept], y=data.test.y[:kept])
    (run_dir / LABELS_FILE).write_text("".join(f"{label}\n" for label in data.labels))
    (run_dir / REPORT_FILE).write_text(report_text)
    title = f"{config.model} on {data.name}"
    plot_curves(history, run_dir / CURVES_FILE, title, [p["first_epoch"] - 1 for p in phases[1:]])
    plot_confusion(matrix, data.labels, run_dir / CONFUSION_FILE, f"{title}: test accuracy {metrics['test_accuracy']:.4f}")

    config_record = asdict(config)
    config_record["image_size"] = list(data.input_shape[:2])
    config_record["color_mode"] = data.color_mode
    record = {
        "run": run_dir.name,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config_record,
        "dataset": data.name,
        "dataset_source": data.source,
        "labels": data.labels,
        "input_shape": list(data.input_shape),
        "color_mode": data.color_mode,
        "resize_method": data.resize_method,
        "split_sizes": data.split_sizes(),
        "test_split_file_images": kept,
        "skipped_files": data.skipped,
        "parameters": {
            "total": int(model.count_params()),
            "trainable": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
        },
        "epochs_run": len(history.get("loss", [])),
        "epochs_planned": sum(epochs for _, epochs in config.plan(spec.transfer)),
        "phases": phases,
        "recipe": recipe,
        "seconds": round(time.time() - started, 1),
        "metrics": metrics,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "history": history,
        "versions": _versions(),
    }
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2))

    sizes = data.split_sizes()
    height, width, channels = data.input_shape
    training_log.append(
        ledger or run_dir.parent / training_log.LEDGER_FILE,
        {
            "finished": record["finished"],
            "run": run_dir.name,
            "model": config.model,
            "dataset": data.name,
            "split": f"{sizes['train']}/{sizes['validation']}/{sizes['test']}",
            "image_size": f"{height}x{width}x{channels}",
            "batch_size": config.batch_size,
            "epochs": f"{record['epochs_run']}/{record['epochs_planned']}",
            "optimizer": config.optimizer,
            "learning_rate": config.learning_rate,
            "augmentation": config.augmentation.describe(),
            "weights": config.weights if spec.transfer else "",
            "seed": config.seed,
            "note": config.note,
            "recipe": _recipe_cell(recipe),
            "recipe_content": recipe["settings"] if recipe else "",
            **metrics,
            "seconds": record["seconds"],
            "run_dir": str(run_dir),
        },
    )
    return record


def _recipe_cell(recipe: dict | None) -> str:
    """The recipe's name in the training log, with what the command line changed in it."""
    if not recipe:
        return ""
    changed = recipe.get("overridden") or {}
    return recipe["name"] + (f" (overridden: {'; '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for package in ("tensorflow", "keras", "numpy", "scikit-learn", "pillow"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return found


def evaluate(run_dir: Path, folder: Path | None = None, batch_size: int = 256) -> dict:
    """Score a run's model on its saved test split, or on every image of a class folder; returns metrics and report."""
    import keras

    from kos_core.artifact import InputSpec
    from kos_core.errors import ImageFolderError
    from kos_core.imagefolder import load_folder

    from .reports import evaluation_metrics, per_class_report

    for required in (MODEL_FILE, RUN_FILE, TEST_SPLIT_FILE):
        if not (run_dir / required).is_file():
            raise TrainingError(f"{run_dir} is not a training run folder: {required} is missing")
    record = json.loads((run_dir / RUN_FILE).read_text())
    labels = record["labels"]
    if folder is None:
        with np.load(run_dir / TEST_SPLIT_FILE) as split:
            x, y = split["x"], split["y"].astype(np.int64)
        source = f"{run_dir / TEST_SPLIT_FILE}"
    else:
        height, width, _ = record["input_shape"]
        spec = InputSpec(height, width, record["color_mode"], record.get("resize_method", "bilinear"))
        try:
            images = load_folder(folder, spec, labels=labels)
        except ImageFolderError as exc:
            raise TrainingError(str(exc)) from None
        x, y, source = images.x, images.y, str(folder)
    model = keras.models.load_model(run_dir / MODEL_FILE)
    probabilities = predict(model, x, batch_size)
    per_class, report_text = per_class_report(probabilities, y, labels)
    return {
        "source": source,
        "images": int(len(y)),
        "metrics": evaluation_metrics(probabilities, y, len(labels)),
        "per_class": per_class,
        "report": report_text,
    }


def benchmark(
    model_name: str,
    images: int,
    image_size: tuple[int, int],
    color_mode: str,
    num_classes: int,
    batch_size: int,
    epochs: int = 2,
    seed: int = 0,
) -> list[float]:
    """Seconds per epoch of training `model_name` on generated uint8 images (the first includes graph tracing)."""
    from .datasets import Dataset, Split

    seed_everything(seed)
    rng = np.random.default_rng(seed)
    channels = 1 if color_mode == "grayscale" else 3
    x = rng.integers(0, 256, size=(images, *image_size, channels), dtype=np.uint8)
    y = np.arange(images, dtype=np.int64) % num_classes
    split = Split(x, y)
    small = Split(x[:batch_size], y[:batch_size])
    data = Dataset("generated", [str(i) for i in range(num_classes)], split, small, small, color_mode)
    config = TrainConfig(model=model_name, batch_size=batch_size, weights="none", fine_tune_epochs=0, epochs=epochs)
    model = build_for(config, data)
    import keras

    model.compile(
        optimizer=make_optimizer("adam", 1e-3), loss=keras.losses.CategoricalCrossentropy(), metrics=training_metrics(num_classes)
    )
    timer = _epoch_timer()
    seconds: list[float] = []

    class Collect(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds.append(float((logs or {})["seconds"]))

    model.fit(
        pipeline(split, num_classes, batch_size, seed, True),
        epochs=epochs,
        callbacks=[timer, Collect()],
        shuffle=False,
        verbose=_verbosity(),
    )
    return seconds
