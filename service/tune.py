"""`python -m service tune MODEL`: measure a model on this machine and write its best runtime settings.

The model's batch size, intra-op threads and batches in flight are measured in-process
(service/measure.py: real JPEG files decoded on every core while batches run), within a time
budget, against a latency target. The winner goes into the model's settings.toml, the file the
service reads beside the model's versions at load; the keys it does not tune, and comments, stay.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kos_core.artifact import ModelMetadata
from kos_core.cpus import available_cpus
from kos_core.layout import list_models, list_versions, model_settings_path, served_file

from .auto_settings import choose, first_threads, ms_per_image
from .measure import Pipeline, Setting, flags_of, sample_jpegs, search
from .model_settings import ModelSettingsError, model_settings, read_overrides
from .settings import AUTO, Settings

TUNED = ("max_batch_size", "intra_op_threads", "inference_workers", "lone_request_threads")
BATCH_SIZES = (1, 8, 32)
# Within this share of the fastest rate, settings count as alike (runs on a shared machine move by 5 to 10 %).
TOLERANCE = 0.10


class TuneError(Exception):
    """Why a model cannot be tuned; its message names the model or file and what to do."""


@dataclass(frozen=True)
class Target:
    """Where the model is: the repository and folder name kos_core.layout takes, and its settings file."""

    repository: Path
    name: str

    @property
    def settings_file(self) -> Path:
        return model_settings_path(self.repository, self.name)


def locate(model: str, repository: Path) -> Target:
    """A model folder given by path (holding version folders), or a model name in `repository`."""
    given = Path(model)
    if given.is_dir() and list_versions(given.parent, given.name):
        return Target(given.parent, given.name)
    if "/" not in model and list_versions(repository, model):
        return Target(repository, model)
    known = ", ".join(sorted(list_models(repository))) if repository.is_dir() else ""
    raise TuneError(
        f"no model {model!r}: neither a model folder (holding VERSION/model.onnx) nor a model in the repository "
        f"{repository} (models there: {known or 'none'}); give a model folder or --repository"
    )


def check_writable(folder: Path) -> None:
    """Refuse before measuring when the settings file could not be written: by creating and removing a file there."""
    probe = folder / f".tune-{os.getpid()}.probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TuneError(
            f"cannot write {folder / 'settings.toml'}: {exc.strerror or exc}; tune needs to write the model's settings "
            "file there (run it where the repository is writable, or copy the model folder and tune the copy)"
        ) from None


def updated_toml(text: str, values: dict[str, Any]) -> str:
    """`text` with each key of `values` set: its line replaced where there is one, else appended; the rest kept."""
    lines = text.splitlines()
    for key, value in values.items():
        line = (
            f"{key} = {value!r}"
            if isinstance(value, str)
            else f"{key} = {str(value).lower() if isinstance(value, bool) else value}"
        )
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        at = next((i for i, existing in enumerate(lines) if pattern.match(existing)), None)
        if at is None:
            lines.append(line)
        else:
            lines[at] = line
    return "\n".join(lines) + "\n"


def write_settings(path: Path, values: dict[str, Any]) -> None:
    """Written beside and renamed into place, so that a running service's scan never reads half a file."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not text:
        text = "# Written by `python -m service tune`; edit freely, keys it does not tune are kept."
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(updated_toml(text, values), encoding="utf-8")
    os.replace(partial, path)


def candidates(before: dict[str, int], cpus: int, budget_steps: int) -> list[tuple[int, int, bool, int]]:
    """The settings measured: the ones in force first, then batch sizes with one batch on every core or one-thread batches side by side."""
    layouts = [(cpus, 1), (1, cpus)] if cpus > 1 else [(1, 1)]
    first = (before["max_batch_size"], before["intra_op_threads"] or cpus, False, before["inference_workers"])
    rest = [(batch, intra, False, workers) for batch in BATCH_SIZES for intra, workers in layouts]
    ordered = [first, *(c for c in rest if c != first)]
    return ordered[: max(2, budget_steps)]


def pick(tried: list[Setting], latency_ms: float | None) -> tuple[Setting, str]:
    """The setting to serve: of those within the latency target, the service's rule (service.measure.service_setting)."""
    meeting = [t for t in tried if latency_ms is None or t.p99_ms <= latency_ms]
    if not meeting:
        quickest = min(tried, key=lambda t: t.p99_ms)
        return quickest, f"no setting met p99 <= {latency_ms:g} ms: chose the lowest p99, {quickest.p99_ms:.1f} ms"
    fastest = max(t.images_per_s for t in meeting)
    near = [t for t in meeting if t.images_per_s >= (1 - TOLERANCE) * fastest]
    chosen = min(near, key=lambda t: (t.intra_op_threads, -t.workers, -t.batch_size))
    target = f" with p99 <= {latency_ms:g} ms" if latency_ms is not None else ""
    return chosen, f"within {TOLERANCE:.0%} of the fastest{target}: the fewest threads, most batches in flight, largest batch"


def tune(target: Target, latency_ms: float | None, budget_s: float, out: Any = sys.stdout) -> dict[str, int]:
    """Measure, choose and write; returns the settings written."""
    began = time.monotonic()
    check_writable(target.settings_file.parent)
    try:
        overrides = read_overrides(target.settings_file)
        # The service's settings from its environment (KOS_*), as a service started here would have them.
        environment: dict[str, Any] = {}
        settings = model_settings(Settings(**environment), overrides, f"{target.name}/settings.toml")
    except ModelSettingsError as exc:
        raise TuneError(str(exc)) from None
    version = max(list_versions(target.repository, target.name))
    path = served_file(target.repository, target.name, version, settings.precision)
    cpus = available_cpus()
    probe = Pipeline(path, [], 1, first_threads(settings, cpus), False)
    metadata: ModelMetadata = probe.spec
    choice = choose(settings, cpus, False, ms_per_image(probe.run, metadata.input_shape))
    # What the service would run with now: the file's values, and "auto" resolved as at load.
    in_force = {key: int(getattr(choice.settings, key)) for key in TUNED}
    sources = {key: "file" if key in overrides else "auto" if getattr(settings, key) == AUTO else "" for key in TUNED}
    print(
        f"tuning {target.name} v{version} ({path.name}, {metadata.height}x{metadata.width}x{metadata.channels}) on {cpus} CPU "
        f"cores: {choice.reason}; budget {budget_s:g} s" + (f", p99 target {latency_ms:g} ms" if latency_ms else ""),
        file=out,
    )
    blobs = sample_jpegs(metadata)
    # About one second a step at least, or the rates are noise; the budget decides how many steps.
    step_s = 1.0
    left = budget_s - (time.monotonic() - began)
    steps = candidates(in_force, cpus, int(left // (step_s + 0.5)))
    step_s = max(0.3, left / len(steps) - 0.5)
    _, tried = search(path, blobs, step_s, steps, lambda line: print(line, file=out, flush=True))
    chosen, why = pick(tried, latency_ms)
    after = flags_of(chosen, cpus)
    write_settings(target.settings_file, after)
    print_table(in_force, after, sources, tried[0], chosen, out)
    print(f"chose {why}; wrote {target.settings_file} in {time.monotonic() - began:.0f} s", file=out)
    return after


def print_table(
    before: dict[str, int], after: dict[str, int], sources: dict[str, str], was: Setting, now: Setting, out: Any
) -> None:
    """The tuned settings before (and where they came from) and after, with what each measured."""
    rows = [(key, f"{before[key]}" + (f" ({sources[key]})" if sources[key] else ""), str(after[key])) for key in TUNED]
    rows += [
        ("images/s, in-process", f"{was.images_per_s:.1f}", f"{now.images_per_s:.1f}"),
        ("p50 ms", f"{was.p50_ms:.2f}", f"{now.p50_ms:.2f}"),
        ("p99 ms", f"{was.p99_ms:.2f}", f"{now.p99_ms:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'before':>16}  {'after':>8}", file=out)
    for name, old, new in rows:
        print(f"{name:{width}}  {old:>16}  {new:>8}", file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service tune",
        description="Measure a model on this machine (batch sizes, intra-op threads, batches in flight; in-process, "
        "CPU) and write the best settings into its settings.toml, which the service reads at load.",
    )
    parser.add_argument("model", help="a model folder (holding VERSION/model.onnx), or a model's name in --repository")
    parser.add_argument("--repository", type=Path, default=Path("models"), help="model repository (default: %(default)s)")
    parser.add_argument(
        "--latency-ms", type=float, default=None, help="p99 target for an image's decode and run in a batch (default: none)"
    )
    parser.add_argument("--budget-s", type=float, default=60.0, help="about how long to measure (default: %(default)s)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.budget_s <= 0:
        print("tune: --budget-s must be positive", file=sys.stderr)
        return 2
    try:
        tune(locate(args.model, args.repository), args.latency_ms, args.budget_s)
    except TuneError as exc:
        print(f"tune: {exc}", file=sys.stderr)
        return 2
    return 0
