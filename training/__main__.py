"""`python -m training`: train image classifiers offline, evaluate runs, and read the training log."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .augmentation import FLIPS, Augmentation
from .errors import TrainingError
from .train import OPTIMIZERS, TrainConfig

MODEL_NAMES = (
    "digits_cnn, mnist_cnn, cifar10_cnn, cifar100_cnn; transfer learning: mobilenet_v2, mobilenet_v3_small, "
    "mobilenet_v3_large, efficientnet_b0, efficientnet_b7, densenet121, densenet201, resnet50, vgg16, xception, "
    "inception_v3 (`python -m training models` describes each)"
)


def image_size(text: str) -> tuple[int, int]:
    """ "64" or "64x48" (height x width) to (64, 64) or (64, 48)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size is HxW or one number, not {text!r}") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"image size is HxW or one number, not {text!r}")
    return size  # type: ignore[return-value]


def _add_train_arguments(train: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    train.add_argument(
        "--recipe",
        metavar="NAME|FILE",
        help="start from a recipe: a bundled one by name (`python -m training recipes` lists them) or your own TOML "
        "file; every option given here overrides the recipe's, and run.json and the training log keep the recipe",
    )
    what = train.add_argument_group("model and data")
    what.add_argument("--model", default=defaults.model, help=f"model from the zoo: {MODEL_NAMES} (default: %(default)s)")
    what.add_argument(
        "--dataset",
        default=defaults.dataset,
        help="digits (scikit-learn, offline), generated (class templates under noise made on the spot: offline, any "
        "size, colour mode and class count), mnist, fashion_mnist, cifar10, cifar100 (keras.datasets, downloaded once), "
        "or the path of an image folder with one sub-folder per class (default: %(default)s)",
    )
    what.add_argument(
        "--generated-classes",
        type=int,
        metavar="N",
        help="--dataset generated: number of classes (default: 10); its images take --image-size and --color-mode, "
        "else the model's natural input",
    )
    what.add_argument(
        "--generated-per-class",
        type=int,
        metavar="N",
        help="--dataset generated: images per class, before the split (default: 100)",
    )
    what.add_argument(
        "--image-size",
        type=image_size,
        metavar="HxW",
        help="resize images to HxW (bilinear, as the service does); default: the data set's own size, "
        "or the model's natural input for an image folder or the generated set (224 for most transfer models)",
    )
    what.add_argument(
        "--color-mode",
        choices=("grayscale", "rgb"),
        help="decode images as greyscale or RGB; default: the data set's own, or the model's for a folder",
    )
    what.add_argument(
        "--validation-split",
        type=float,
        dest="validation",
        metavar="FRACTION",
        help="share held out for validation, stratified (default: 0.15; 0.1 of the training set for keras.datasets)",
    )
    what.add_argument(
        "--test-split",
        type=float,
        dest="test",
        metavar="FRACTION",
        help="share held out for the final test, stratified (default: 0.15; keras.datasets keep their official test set)",
    )

    fit = train.add_argument_group("optimisation")
    fit.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="most epochs; early stopping may end sooner. A transfer model from pretrained weights runs --epochs for "
        "its head and then --fine-tune-epochs more (10 by default): --epochs 1 runs up to 11 in all unless "
        "--fine-tune-epochs 0; the first lines a run prints say its total (default: %(default)s)",
    )
    fit.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step (default: %(default)s)")
    fit.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=defaults.optimizer,
        help="adam, sgd (with Nesterov momentum) or rmsprop (default: %(default)s)",
    )
    fit.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="initial learning rate (default: %(default)s)"
    )
    fit.add_argument(
        "--momentum", type=float, default=defaults.momentum, help="momentum of sgd and rmsprop (default: %(default)s)"
    )
    fit.add_argument(
        "--label-smoothing",
        type=float,
        default=defaults.label_smoothing,
        help="label smoothing of the loss (default: %(default)s)",
    )
    fit.add_argument(
        "--monitor",
        choices=("val_loss", "val_accuracy", "val_auc"),
        default=defaults.monitor,
        help="validation metric watched by early stopping, the learning-rate schedule and the checkpoint (default: %(default)s)",
    )
    fit.add_argument(
        "--patience",
        type=int,
        default=defaults.patience,
        help="early stopping: epochs without improvement before stopping; the best weights are restored (default: %(default)s)",
    )
    fit.add_argument(
        "--lr-patience",
        type=int,
        default=defaults.lr_patience,
        help="ReduceLROnPlateau: epochs without improvement before the learning rate drops (default: %(default)s)",
    )
    fit.add_argument(
        "--lr-factor",
        type=float,
        default=defaults.lr_factor,
        help="ReduceLROnPlateau: factor of each drop (default: %(default)s)",
    )
    fit.add_argument(
        "--min-lr", type=float, default=defaults.min_lr, help="ReduceLROnPlateau: lowest learning rate (default: %(default)s)"
    )
    fit.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed for splits, weights, shuffling and augmentation (default: %(default)s)",
    )
    fit.add_argument(
        "--nondeterministic",
        action="store_true",
        help="allow TensorFlow's non-deterministic ops: a little faster on a GPU, but a rerun differs slightly "
        "(default: deterministic, the same command trains the same model)",
    )

    aug = train.add_argument_group("augmentation (training batches only; never part of the saved model)")
    aug.add_argument(
        "--shift", type=float, default=0.0, help="random shifts up to this fraction of height and width, e.g. 0.1 (default: off)"
    )
    aug.add_argument(
        "--rotation", type=float, default=0.0, help="random rotations up to this many degrees, e.g. 20 (default: off)"
    )
    aug.add_argument("--zoom", type=float, default=0.0, help="random zoom in or out up to this fraction, e.g. 0.1 (default: off)")
    aug.add_argument("--flip", choices=FLIPS, default="none", help="random flips (default: %(default)s)")
    aug.add_argument("--contrast", type=float, default=0.0, help="random contrast change up to this fraction (default: off)")

    transfer = train.add_argument_group("transfer learning (keras.applications backbones)")
    transfer.add_argument(
        "--weights",
        default=defaults.weights,
        metavar="imagenet|none|FILE",
        help="start from ImageNet weights (downloaded once into ~/.keras/models), from a weights file of the backbone "
        "without its top (a .weights.h5 saved elsewhere), or from random weights with `none`, which needs no internet: "
        "with nothing pretrained the whole network trains, in one phase of --epochs (default: %(default)s)",
    )
    transfer.add_argument(
        "--dropout", type=float, default=defaults.dropout, help="dropout before the new softmax head (default: %(default)s)"
    )
    transfer.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=defaults.fine_tune_epochs,
        help="phase 2: epochs with the top of the base unfrozen, after phase 1 trained the head on the "
        "frozen base for --epochs, so a run takes up to --epochs + --fine-tune-epochs in all; 0 trains the head "
        "only; not used with --weights none (default: %(default)s)",
    )
    transfer.add_argument(
        "--fine-tune-layers",
        type=int,
        default=defaults.fine_tune_layers,
        help="phase 2: how many top layers of the base to unfreeze; batch norm stays frozen (default: %(default)s)",
    )
    transfer.add_argument(
        "--fine-tune-learning-rate", type=float, help="phase 2 learning rate (default: a tenth of --learning-rate)"
    )

    out = train.add_argument_group("the run's records")
    out.add_argument(
        "--run-dir",
        type=Path,
        help="folder the run writes: model.keras, run.json, test_split.npz, labels.txt, history.csv, "
        "checkpoint.keras, curves.png, confusion_matrix.png, classification_report.txt "
        "(default: runs/<model>-<dataset>-<UTC time>)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace the run folder if it already holds a run")
    out.add_argument(
        "--ledger", type=Path, help="training log the run appends its row to (default: ledger.csv beside the run folder)"
    )
    out.add_argument("--note", default="", help="free text for the training log: what this run changed or tries")
    out.add_argument(
        "--verbose", action="store_true", help="show everything TensorFlow prints, its native start-up lines included"
    )
    out.add_argument(
        "--max-test-images",
        type=int,
        default=defaults.max_test_images,
        help="most held-out test images saved in test_split.npz for export's parity check; all of them are "
        "used for the test metrics (default: %(default)s)",
    )


class _HelpFormatter(argparse.HelpFormatter):
    """Help text wrapped between words only: an option such as --fine-tune-epochs is never split across lines."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _RecipeParser(argparse.ArgumentParser):
    """The train command's parser for a recipe's options: a bad value names the recipe instead of exiting."""

    recipe = ""

    def error(self, message: str):  # type: ignore[override]
        raise TrainingError(f"recipe {self.recipe}: {message}")


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = parser_class(
        prog="python -m training",
        description="Train Keras image classifiers, evaluate trained runs, and compare runs in the training log.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,recipes,evaluate,log,models,benchmark}")
    train = sub.add_parser(
        "train",
        formatter_class=_HelpFormatter,
        help="train a model and write a run folder",
        description="Train a zoo model on a data set, evaluate it on the held-out test split, write the run folder "
        "and append a row to the training log. Early stopping restores the best weights; the learning rate drops on "
        "plateaus; the best model is checkpointed as training goes.",
    )
    _add_train_arguments(train, defaults)

    recipes = sub.add_parser(
        "recipes",
        help="list the bundled recipes and the figure each is known to reach",
        description="List the bundled recipes (`train --recipe NAME`), with the figure each is known to reach and where "
        "that figure comes from; with a NAME (or a recipe file), print the recipe itself.",
    )
    recipes.add_argument("name", nargs="?", help="a recipe to print in full")

    evaluate = sub.add_parser(
        "evaluate",
        help="score a run's model on its test split or on an image folder",
        description="Load a run's model.keras and report loss, accuracy, AUC and per-class precision, recall and F1.",
    )
    evaluate.add_argument("run_dir", type=Path, help="a run folder written by `train`")
    evaluate.add_argument(
        "--data",
        type=Path,
        help="an image folder with one sub-folder per class (named like the run's labels) "
        "to score instead of the run's saved test split",
    )
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.add_argument("--verbose", action="store_true", help="show everything TensorFlow prints")

    log = sub.add_parser(
        "log",
        help="print the training log as a table",
        description="Print the training log: one row per run, to compare runs side by side.",
    )
    log.add_argument("--ledger", type=Path, default=Path("runs") / "ledger.csv", help="the training log (default: %(default)s)")
    log.add_argument(
        "--columns",
        help="comma-separated columns to show (default: the main settings and test metrics); `all` shows every column",
    )
    log.add_argument("--sort", help="sort by this column, best first (lowest for losses and seconds, highest otherwise)")
    log.add_argument("--last", type=int, help="only the last N runs")
    log.add_argument("--model", help="only runs of this model")
    log.add_argument("--dataset", help="only runs on this data set")
    log.add_argument("--markdown", action="store_true", help="print a Markdown table")

    sub.add_parser("models", help="list the model zoo and the built-in data sets")

    bench = sub.add_parser(
        "benchmark",
        help="time training epochs on generated images",
        description="Time training epochs of a zoo model on random uint8 images (no download, "
        "random weights) and print seconds and images per second for each epoch.",
    )
    bench.add_argument("--model", default="cifar10_cnn", help="zoo model (default: %(default)s)")
    bench.add_argument("--images", type=int, default=5000, help="images per epoch (default: %(default)s)")
    bench.add_argument("--image-size", type=image_size, default=(32, 32), metavar="HxW", help="(default: 32x32)")
    bench.add_argument("--color-mode", choices=("grayscale", "rgb"), default="rgb", help="(default: %(default)s)")
    bench.add_argument("--classes", type=int, default=10, help="(default: %(default)s)")
    bench.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    bench.add_argument(
        "--epochs", type=int, default=2, help="epochs to time; the first includes graph tracing (default: %(default)s)"
    )
    bench.add_argument("--verbose", action="store_true", help="show everything TensorFlow prints")
    return parser


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        image_size=args.image_size,
        color_mode=args.color_mode,
        validation=args.validation,
        test=args.test,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        label_smoothing=args.label_smoothing,
        monitor=args.monitor,
        patience=args.patience,
        lr_patience=args.lr_patience,
        lr_factor=args.lr_factor,
        min_lr=args.min_lr,
        augmentation=Augmentation(
            shift=args.shift, rotation=args.rotation, zoom=args.zoom, flip=args.flip, contrast=args.contrast
        ),
        weights=args.weights,
        dropout=args.dropout,
        fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_layers=args.fine_tune_layers,
        fine_tune_learning_rate=args.fine_tune_learning_rate,
        seed=args.seed,
        deterministic=not args.nondeterministic,
        note=args.note,
        max_test_images=args.max_test_images,
        generated_classes=args.generated_classes,
        generated_per_class=args.generated_per_class,
    )


def _log(args: argparse.Namespace) -> None:
    from . import ledger

    where = {k: v for k, v in (("model", args.model), ("dataset", args.dataset)) if v}
    rows = ledger.select(ledger.read(args.ledger), sort=args.sort, last=args.last, where=where)
    if args.columns == "all":
        columns = list(rows[0]) if rows else ledger.COLUMNS
    elif args.columns:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    else:
        columns = [c for c in ledger.DEFAULT_VIEW if not rows or c in rows[0]]
    if rows:
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise TrainingError(f"the training log has no column(s) {', '.join(missing)}; it has {', '.join(rows[0])}")
    print(ledger.format_table(rows, columns, markdown=args.markdown))
    print(f"\n{len(rows)} run(s) in {args.ledger}")


def _models() -> None:
    from .datasets import LOADERS
    from .models import zoo

    print("models (python -m training train --model NAME):")
    for name, spec in zoo().items():
        height, width = spec.default_size
        size = f"{height}x{width}"
        print(f"  {name:<20} {size:<8} {spec.default_color_mode:<9} {spec.description}")
    print("\ndata sets (--dataset NAME, or --dataset path/to/folder with one sub-folder per class):")
    for name, loader in LOADERS.items():
        print(f"  {name:<20} {(loader.__doc__ or '').strip().splitlines()[0]}")


def _recipes(name: str | None) -> None:
    from . import recipe as recipes

    if name:
        chosen = recipes.load(name)
        print(f"# recipe {chosen.name} ({chosen.path})\n{chosen.content}", end="")
        return
    print("recipes (python -m training train --recipe NAME; options given beside it override the recipe's):")
    for found in recipes.bundled().values():
        where = "measured here" if found.measured_here else "not measured here"
        print(f"  {found.name:<24} {found.description}")
        print(f"  {'':<24} known figure: {found.known_figure or 'none'} ({where})")
        print(f"  {'':<24} from: {found.figure_source}")
    print(f"\nbundled in {recipes.bundled_folder()}; your own recipe file works the same: --recipe path/to/recipe.toml")


def _parse_train(argv: list[str]) -> tuple[argparse.Namespace, dict | None]:
    """The train command's options, a recipe's underneath when --recipe names one; the recipe as run.json keeps it."""
    args = build_parser().parse_args(argv)
    if not args.recipe:
        return args, None
    from . import recipe as recipes

    chosen = recipes.load(args.recipe)
    own = chosen.argv()
    checker = build_parser(_RecipeParser)
    _RecipeParser.recipe = f"{chosen.name} ({chosen.path})"
    # Parsed alone first, so that a bad value in the file is named as the recipe's.
    from_recipe = checker.parse_args(["train", *own])
    # argparse keeps the last value of an option: the recipe's come first, the command line's win.
    merged = build_parser().parse_args([argv[0], *own, *argv[1:]])
    dests = {action.option_strings[0].removeprefix("--"): action.dest for action in _train_actions(checker)}
    overridden = {}
    for key in chosen.train:
        dest = dests[key]
        if getattr(merged, dest) != getattr(from_recipe, dest):
            overridden[key] = getattr(merged, dest)
    record = {
        "name": chosen.name,
        "path": chosen.path,
        "content": chosen.content,
        "options": chosen.train,
        "overridden": {
            k: list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, Path) else v) for k, v in overridden.items()
        },
        "known_figure": chosen.known_figure,
        "figure_source": chosen.figure_source,
        "settings": chosen.settings(),
    }
    return merged, record


def _train_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices["train"]._actions if a.option_strings and a.option_strings[0].startswith("--")]


def main(argv: list[str] | None = None) -> None:
    from kos_core.console import quiet_native_logs

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command in ("train", "evaluate", "benchmark"):
        # Before TensorFlow is imported: its native start-up lines (cuInit on a machine without a GPU) read like failures.
        quiet_native_logs(verbose=args.verbose)
    try:
        if args.command == "train":
            from .train import default_run_dir, train

            args, recipe = _parse_train(argv)
            config = _config(args)
            run_dir = args.run_dir or default_run_dir(config)
            record = train(config, run_dir, ledger=args.ledger, overwrite=args.overwrite, recipe=recipe)
            metrics = record["metrics"]
            print(
                f"run {run_dir}: test accuracy {metrics['test_accuracy']:.4f}, AUC {metrics['test_auc']:.4f} "
                f"after {record['epochs_run']} epochs ({record['seconds']} s)"
            )
        elif args.command == "evaluate":
            from .train import evaluate

            result = evaluate(args.run_dir, args.data)
            if args.json:
                print(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2))
            else:
                print(f"{result['images']} images from {result['source']}")
                print("  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
                print(result["report"])
        elif args.command == "recipes":
            _recipes(args.name)
        elif args.command == "log":
            _log(args)
        elif args.command == "models":
            _models()
        elif args.command == "benchmark":
            from .train import benchmark

            seconds = benchmark(
                args.model, args.images, args.image_size, args.color_mode, args.classes, args.batch_size, args.epochs
            )
            for epoch, s in enumerate(seconds, start=1):
                print(
                    f"epoch {epoch}: {s:.2f} s, {args.images / s:.0f} images/s "
                    f"({args.model}, {args.images} images of {args.image_size[0]}x{args.image_size[1]}, batch {args.batch_size})"
                )
    except TrainingError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
