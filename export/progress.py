"""A plain progress bar on stderr for the long steps of an export (stdout keeps the model card)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """`[#####.....] 1280/2000 images 3.1s`, redrawn in place; silent for work that fits one step."""

    def __init__(self, total: int, unit: str = "images", stream: TextIO | None = None, width: int = 30):
        self.total, self.unit, self.width = total, unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = time.monotonic()

    def advance(self, count: int) -> None:
        self.done = min(self.total, self.done + count)
        if self.done == count and self.done == self.total:
            return  # one step did everything: no bar to watch
        filled = int(self.width * self.done / max(self.total, 1))
        end = "\n" if self.done >= self.total else ""
        self.stream.write(
            f"\r  [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {self.unit} "
            f"{time.monotonic() - self.started:.1f}s{end}"
        )
        self.stream.flush()
