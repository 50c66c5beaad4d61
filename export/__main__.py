"""`python -m export`: a training run to a verified ONNX model in the model repository."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Convert a training run's Keras model to ONNX (tf2onnx), check parity with Keras on the run's "
        "held-out test images, and write <repository>/<name>/<version>/model.onnx with its metadata inside.",
    )
    parser.add_argument("run_dir", type=Path, help="training run folder written by `python -m training train`")
    parser.add_argument("--name", required=True, help="served model name (the URL's /predict/<name>)")
    parser.add_argument("--repository", type=Path, default=Path("models"), help="model repository (default: %(default)s)")
    parser.add_argument("--version", type=int, help="version to write (default: one above the highest there)")
    parser.add_argument("--overwrite", action="store_true", help="replace the version if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .convert import ExportError, export_run

    try:
        path, metadata = export_run(args.run_dir, args.name, args.repository, args.version, args.overwrite)
    except ExportError as exc:
        sys.exit(f"export refused: {exc}")
    parity = metadata.parity
    print(
        f"wrote {path}\n  labels: {len(metadata.labels)}  input: {metadata.height}x{metadata.width}x{metadata.channels} "
        f"{metadata.color_mode}\n  test metrics: {metadata.metrics}\n  parity: {parity['images']} images, "
        f"max |diff| {parity['max_abs_difference']:.2e}, top-1 agreement {parity['top1_agreement']:.4f}"
    )


if __name__ == "__main__":
    main()
