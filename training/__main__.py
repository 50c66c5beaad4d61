"""`python -m training`: train image classifiers offline."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m training", description="Train Keras image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model and write a run folder")
    train.add_argument("--model", default=defaults.model, help="model from the zoo (default: %(default)s)")
    train.add_argument("--dataset", default=defaults.dataset, help="data set (default: %(default)s)")
    train.add_argument("--epochs", type=int, default=defaults.epochs, help="most epochs; early stopping may end sooner (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    train.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="(default: %(default)s)")
    train.add_argument("--patience", type=int, default=defaults.patience, help="early-stopping patience in epochs (default: %(default)s)")
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed for splits, weights and shuffling (default: %(default)s)")
    train.add_argument("--run-dir", type=Path, required=True, help="folder the run writes: model, labels, metrics, test split")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .train import TrainConfig, train

    if args.command == "train":
        config = TrainConfig(
            model=args.model,
            dataset=args.dataset,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            patience=args.patience,
            seed=args.seed,
        )
        try:
            record = train(config, args.run_dir)
        except ValueError as exc:
            sys.exit(f"error: {exc}")
        print(f"run {args.run_dir}: test accuracy {record['metrics']['test_accuracy']:.4f} after {record['epochs_run']} epochs")


if __name__ == "__main__":
    main()
