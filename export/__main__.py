"""`python -m export`: a training run (or a saved Keras model) to a verified ONNX model in the model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Convert a Keras image classifier to ONNX (tf2onnx) and write it to the model repository as
<repository>/<name>/<version>/model.onnx: input `image` uint8 NHWC with a dynamic batch, output
`probabilities` float32, with its labels, input shape, colour mode, resize method, provenance,
test metrics, parity figures and tool versions inside the file.

Every export is verified before anything is written: augmentation layers must be gone from the
graph and preprocessing layers present; Keras and onnxruntime must give the same answers on
held-out images (largest probability difference <= 1e-4, same top-1 class on every image), and
those answers must depend on the image (some class's probability varies by 1e-3 or more across
the images; otherwise parity is inconclusive and refused unless --allow-inconclusive-parity). A
refused export writes nothing. Writing is atomic, so a service watching the repository never
loads half a model. A model card is printed at the end.
"""

EPILOG = """\
sources:
  a training run folder    written by `python -m training train`: model.keras, run.json (labels,
                           input shape, colour mode, metrics) and test_split.npz (held-out images).
  a saved Keras model      a .keras file; give its labels with --labels (a text file, one label a
                           line, or a JSON list) and held-out images with --images. H, W and C are
                           read from the model; the colour mode follows C (1 greyscale, 3 RGB).

held-out images (--images FOLDER): image files decoded to the model's input size with the
  resize method; class subfolders named after the labels give each image its class, which the
  variants' accuracy check uses (without them, the float32 model's answers are the reference).

variants (--variants float16 int8): extra files in the same version folder, model.float16.onnx
  (float16 weights for GPUs, same inputs and outputs) and model.int8.onnx (static int8
  quantisation for CPUs, calibrated on --calibration-size training images of the run's data set,
  or on --calibration-images FOLDER). Each is refused if it loses more than 1 point of accuracy
  on the held-out images, unless --force-variants.

show a repository model's card again:
  python -m export show <repository>/<name>/<version>    (or <repository>/<name> for the latest,
                                                          or a .onnx file)

examples:
  python -m export runs/digits --name digits
  python -m export runs/cifar --name cifar10 --variants float16 int8
  python -m export model.keras --labels labels.txt --images held_out/ --name flowers
  python -m export show models/digits/1
"""


def build_parser() -> argparse.ArgumentParser:
    from .convert import OPSET
    from .parity import MAX_ACCURACY_DROP_POINTS
    from .variants import CALIBRATION_IMAGES, VARIANTS

    parser = argparse.ArgumentParser(
        prog="python -m export",
        usage="python -m export SOURCE --name NAME [options]\n       python -m export show PATH",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="training run folder, or a saved Keras model (.keras) with --labels")
    parser.add_argument("--name", required=True, help="served model name: the repository folder and the URL's /predict/<name>")
    parser.add_argument("--repository", type=Path, default=Path("models"), help="model repository (default: %(default)s)")
    parser.add_argument("--version", type=int, help="version to write (default: one above the highest there)")
    parser.add_argument("--overwrite", action="store_true", help="replace the version if it exists")
    parser.add_argument("--labels", type=Path, help="class labels of a .keras source: text, one a line, or a JSON list")
    parser.add_argument(
        "--images", type=Path, help="folder of held-out images for the parity check (default: the run's test split)"
    )
    parser.add_argument("--dataset", help="data set name recorded for a .keras source (default: unknown)")
    parser.add_argument(
        "--resize-method",
        choices=["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"],
        help="how the service resizes uploads for a .keras source (default: bilinear)",
    )
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset, %(default)s or newer (default: %(default)s)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=[],
        metavar="VARIANT",
        help=f"also write reduced-precision files: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--force-variants",
        action="store_true",
        help=f"keep a variant that loses more than {MAX_ACCURACY_DROP_POINTS:g} point of accuracy",
    )
    parser.add_argument(
        "--allow-inconclusive-parity",
        action="store_true",
        help="export even when the held-out images do not move the model's answers (a backbone with random weights "
        "answers alike for every image), so parity cannot prove anything; the card and metadata say inconclusive",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show everything TensorFlow prints, its native start-up lines included"
    )
    parser.add_argument(
        "--calibration-images", type=Path, help="folder of training images to calibrate int8 on (default: the run's data set)"
    )
    parser.add_argument(
        "--calibration-size",
        type=int,
        default=CALIBRATION_IMAGES,
        help="training images int8 is calibrated on (default: %(default)s)",
    )
    return parser


def build_show_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export show", description="Print the model card of a repository model.")
    parser.add_argument(
        "path", type=Path, help="<repository>/<name>/<version>, <repository>/<name> (latest version) or a .onnx file"
    )
    return parser


def run_show(argv: list[str]) -> None:
    args = build_show_parser().parse_args(argv)
    from .card import show
    from .errors import ExportError

    try:
        print(show(args.path))
    except ExportError as exc:
        sys.exit(f"error: {exc}")


def run_export(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from kos_core.console import quiet_native_logs

    # TensorFlow's start-up chatter (cuInit on a machine without a GPU) reads like a failure; before TensorFlow loads.
    quiet_native_logs(verbose=args.verbose)
    from .card import model_card
    from .errors import ExportError
    from .exporter import export
    from .source import load_image_folder, load_source

    try:
        if args.calibration_size < 1:
            raise ExportError("--calibration-size must be at least 1")
        source = load_source(args.source, args.labels, args.dataset, args.resize_method)
        images = load_image_folder(args.images, source) if args.images else None
        calibration = None
        if args.calibration_images:
            calibration = load_image_folder(args.calibration_images, source, limit=args.calibration_size).x
        result = export(
            source,
            args.name,
            args.repository,
            version=args.version,
            overwrite=args.overwrite,
            images=images,
            variants=args.variants,
            calibration=calibration,
            force_variants=args.force_variants,
            allow_inconclusive_parity=args.allow_inconclusive_parity,
            opset=args.opset,
            show_progress=True,
        )
    except ExportError as exc:
        sys.exit(f"export refused: {exc}")
    print(f"wrote {', '.join(str(p) for p in result.files.values())}\n")
    print(model_card(result.metadata, result.path))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `show` is a sub-command beside the export itself, which keeps its plain `python -m export <run> --name` form.
    if argv and argv[0] == "show":
        run_show(argv[1:])
    else:
        run_export(argv)


if __name__ == "__main__":
    main()
