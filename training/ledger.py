"""The training log: one CSV row per run, appended, and printed as a table to compare runs side by side."""

from __future__ import annotations

import csv
import fcntl
import io
from pathlib import Path

from .errors import TrainingError

LEDGER_FILE = "ledger.csv"

# The log's columns, in the order a hyper-parameter spreadsheet would have them.
COLUMNS = [
    "finished",
    "run",
    "model",
    "dataset",
    "split",
    "image_size",
    "batch_size",
    "epochs",
    "optimizer",
    "learning_rate",
    "augmentation",
    "weights",
    "seed",
    "note",
    "recipe",
    "recipe_content",
    "test_accuracy",
    "test_auc",
    "test_loss",
    "test_macro_f1",
    "test_top5_accuracy",
    "seconds",
    "run_dir",
]

# What `log` shows unless asked for other columns: wide enough to compare, narrow enough for a terminal.
DEFAULT_VIEW = [
    "finished",
    "run",
    "model",
    "dataset",
    "split",
    "image_size",
    "batch_size",
    "epochs",
    "optimizer",
    "learning_rate",
    "augmentation",
    "note",
    "test_accuracy",
    "test_auc",
    "test_loss",
]


def append(ledger: Path, row: dict[str, object]) -> None:
    """Append one run's row; the header is written with the first row. Safe against concurrent runs."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "a+", newline="") as handle:
        # An exclusive lock so two runs finishing together cannot interleave their lines.
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            header = next(csv.reader(handle), None)
            handle.seek(0, io.SEEK_END)
            if header is None:
                header = COLUMNS
                csv.writer(handle).writerow(header)
            unknown = sorted(set(row) - set(header))
            if unknown:
                # An older log without some columns: keep its layout, and keep nothing silently lost.
                row = {**row, "note": f"{row.get('note', '')} [{'; '.join(f'{k}={row[k]}' for k in unknown)}]".strip()}
            csv.DictWriter(handle, fieldnames=header, extrasaction="ignore", restval="").writerow(
                {k: _cell(v) for k, v in row.items()}
            )
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def read(ledger: Path) -> list[dict[str, str]]:
    """Every row of the log, oldest first."""
    if not ledger.is_file():
        raise TrainingError(f"no training log at {ledger}: it is written by `python -m training train` (see --ledger)")
    with open(ledger, newline="") as handle:
        return list(csv.DictReader(handle))


def format_table(rows: list[dict[str, str]], columns: list[str], markdown: bool = False, max_width: int = 40) -> str:
    """Rows as an aligned plain-text (or Markdown) table; long cells are cut with an ellipsis."""

    def cut(text: str) -> str:
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cut(row.get(c) or "") for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(_is_number(r[i]) or not r[i] for r in cells) and bool(cells) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    rule = (
        ("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|")
        if markdown
        else "  ".join("-" * w for w in widths)
    )
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def select(
    rows: list[dict[str, str]], sort: str | None = None, last: int | None = None, where: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """Filter rows by exact column values, sort them (best first for metrics), keep the last N."""
    for key, value in (where or {}).items():
        rows = [r for r in rows if r.get(key) == value]
    if last:
        rows = rows[-last:]
    if sort:
        if rows and sort not in rows[0]:
            raise TrainingError(f"the training log has no column {sort!r}; it has {', '.join(rows[0])}")
        lower_is_better = sort.endswith("loss") or sort == "seconds"

        def key(row: dict[str, str]) -> tuple[int, float | str]:
            value = row.get(sort) or ""
            if _is_number(value):
                number = float(value)
                return (0, number if lower_is_better else -number)
            return (1, value)

        rows = sorted(rows, key=key)
    return rows
