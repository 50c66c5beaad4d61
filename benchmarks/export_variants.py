"""Size, accuracy and CPU speed of the float16 and int8 variants against the float32 model.

Exports a training run with both variants through `export.exporter.export` (the same checks as
`python -m export ... --variants float16 int8`) into a temporary repository, then measures each
file with onnxruntime on the CPU: size on disk, top-1 accuracy on the run's held-out test split,
latency of one image, and throughput at a larger batch. Prints a table and writes JSON.

    python benchmarks/export_variants.py --run runs/digits
    python benchmarks/export_variants.py --generated cifar10_cnn     # a zoo model fitted briefly on generated images

`--generated` trains the zoo model for a few epochs on the generated data set (a fixed random
template per class under noise: learnable, and needing no download) with `python -m training
train`, so the run folder is a real one; int8 is calibrated on its training images, reloaded from
the run's record as for any run. Variants are
kept even when they lose accuracy (forced), so the table always shows what each one costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generated_run(model_name: str, run_dir: Path, epochs: int, seed: int = 0) -> None:
    """Train a zoo model on the generated data set with `python -m training train`, as a user would."""
    import subprocess

    command = [
        sys.executable, "-m", "training", "train", "--model", model_name, "--dataset", "generated",
        "--generated-classes", "10", "--generated-per-class", "150", "--epochs", str(epochs), "--batch-size", "8",
        "--learning-rate", "0.0003", "--weights", "none", "--seed", str(seed), "--run-dir", str(run_dir),
        "--ledger", str(run_dir.parent / "ledger.csv"),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)


def measure(
    paths: dict[str, Path], x: np.ndarray, y: np.ndarray, batch: int, seconds: float, threads: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Accuracy, single-image latency (median ms) and batch throughput (images/s) of each file on the CPU.

    The files take turns, round after round, so a machine whose load drifts during the run
    slows each of them alike and the ratios stay fair.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {p: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for p, path in paths.items()}
    single, batched = x[:1], np.resize(x, (batch, *x.shape[1:]))
    samples: dict[str, dict[str, list[float]]] = {p: {"single": [], "batched": []} for p in paths}
    for session in sessions.values():
        for images in (single, batched):
            for _ in range(5):  # warm-up: first runs allocate and pick kernels
                session.run(None, {"image": images})
    for round_ in range(rounds):
        print(f"  timing round {round_ + 1}/{rounds}", file=sys.stderr, flush=True)
        for precision, session in sessions.items():
            for kind, images in (("single", single), ("batched", batched)):
                deadline = time.perf_counter() + seconds / (2 * rounds)
                while True:
                    started = time.perf_counter()
                    session.run(None, {"image": images})
                    samples[precision][kind].append(time.perf_counter() - started)
                    if time.perf_counter() > deadline:
                        break
    rows = {}
    for precision, session in sessions.items():
        probabilities = np.concatenate([session.run(None, {"image": x[i : i + 256]})[0] for i in range(0, len(x), 256)])
        rows[precision] = {
            "bytes": paths[precision].stat().st_size,
            "accuracy": float((probabilities.argmax(1) == y).mean()),
            "latency_ms": 1000 * statistics.median(samples[precision]["single"]),
            "images_per_s": batch / statistics.median(samples[precision]["batched"]),
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a training run folder (int8 calibrates on its data set's training images)")
    source.add_argument("--generated", metavar="MODEL", help="a zoo model fitted on generated images, e.g. cifar10_cnn")
    parser.add_argument("--epochs", type=int, default=10, help="epochs for --generated (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the throughput figure (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per file, all rounds together (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds in which the files take turns (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads, 0 = all cores (default: %(default)s)"
    )
    parser.add_argument(
        "--json", type=Path, default=Path("export_variants.json"), help="where the figures go (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from export.errors import ExportError
    from export.exporter import export
    from export.source import load_run
    from kos_core.layout import model_path

    with tempfile.TemporaryDirectory(prefix="export-variants-") as scratch:
        calibration = None
        run_dir = args.run
        if args.generated:
            run_dir = Path(scratch) / "run"
            print(f"training {args.generated} on the generated data set for {args.epochs} epochs", file=sys.stderr)
            generated_run(args.generated, run_dir, args.epochs)
        run = load_run(run_dir)
        repository = Path(scratch) / "models"
        try:
            result = export(
                run,
                "bench",
                repository,
                variants=["float16", "int8"],
                calibration=calibration,
                force_variants=True,
                show_progress=True,
            )
        except ExportError as exc:
            sys.exit(f"export refused: {exc}")
        x, y = run.held_out.x, run.held_out.y
        print("measuring float32, float16 and int8 on the CPU, taking turns", file=sys.stderr, flush=True)
        paths = {p: model_path(repository, "bench", 1, p) for p in ("float32", "float16", "int8")}
        rows = measure(paths, x, y, args.batch, args.seconds, args.threads, args.rounds)

    base = rows["float32"]
    for row in rows.values():
        row["size_ratio"] = row["bytes"] / base["bytes"]
        row["accuracy_drop_points"] = 100 * (base["accuracy"] - row["accuracy"])
        row["latency_ratio"] = row["latency_ms"] / base["latency_ms"]
        row["throughput_ratio"] = row["images_per_s"] / base["images_per_s"]
    model = result.metadata.architecture
    print(
        f"\n{model} ({run_dir if args.run else 'generated data'}), {len(x)} held-out images, "
        f"parity max |prob diff| {result.parity.max_abs_difference:.2e}, CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores"
    )
    header = f"{'precision':<10}{'size':>10}{'x f32':>7}{'accuracy':>10}{'drop pt':>9}{'1-image ms':>12}{'x f32':>7}{f'batch{args.batch} img/s':>16}{'x f32':>7}"
    print(header)
    print("-" * len(header))
    for precision, r in rows.items():
        print(
            f"{precision:<10}{r['bytes'] / 1e3:>8.0f}kB{r['size_ratio']:>7.2f}{r['accuracy']:>10.4f}{r['accuracy_drop_points']:>9.2f}"
            f"{r['latency_ms']:>12.3f}{r['latency_ratio']:>7.2f}{r['images_per_s']:>16.0f}{r['throughput_ratio']:>7.2f}"
        )
    report = {
        "model": model,
        "source": str(run_dir) if args.run else f"generated ({args.epochs} epochs)",
        "held_out_images": len(x),
        "batch": args.batch,
        "rounds": args.rounds,
        "seconds_per_file": args.seconds,
        "threads": args.threads or os.cpu_count(),
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "parity": result.parity.as_metadata(),
        "variants_check": {p: c.as_metadata() for p, c in result.variants.items()},
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
