"""What the offline tools print: progress that suits a terminal and a log file alike, and no native-library noise.

Framework-free on purpose: `python -m training` and `python -m export` set this up before
TensorFlow is imported, since TensorFlow's C++ start-up lines are written before any Python
logging setting can reach them.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
from typing import TextIO

# A C++ log line of TensorFlow / absl / XLA: level letter, date, time, thread, file:line].
_NATIVE_LINE = re.compile(r"^(?P<level>[IWEF])\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] ")
# Error-level native lines that are no failure: probing for a GPU that is not there, and a
# graph attribute newer than the runtime's op registry. Anything else at error level is kept.
_HARMLESS_ERRORS = (
    "failed call to cuInit",
    "NodeDef mentions attribute",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
)
_MAY_BE_NATIVE = re.compile(rb"^([IWEF]\d|WARNING: All)")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def is_native_noise(line: str) -> bool:
    """Whether a stderr line is TensorFlow's native start-up or probing chatter rather than something to read."""
    text = line.rstrip("\n")
    if text == _ABSL_PREAMBLE:
        return True
    match = _NATIVE_LINE.match(text)
    if match is None:
        return False
    return match["level"] in "IW" or any(marker in text for marker in _HARMLESS_ERRORS)


class _StderrFilter:
    """File descriptor 2 through a pipe; a thread passes on every line that is not native noise."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._original = os.dup(2)
        self.terminal = os.isatty(self._original)
        read_end, self._write_end = os.pipe()
        os.dup2(self._write_end, 2)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="stderr-filter", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe, os.fdopen(self._original, "wb", buffering=0, closefd=False) as out:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not is_native_noise(line.decode("utf-8", "replace")):
                        out.write(line + b"\n")
                if pending and not _MAY_BE_NATIVE.match(pending):
                    # A progress bar redrawn with carriage returns has no newline yet: pass it on now.
                    out.write(pending)
                    pending = b""
            if pending:
                out.write(pending)

    def close(self) -> None:
        """Put stderr back and let the thread drain what is left (SystemExit's message among it)."""
        try:
            sys.stderr.flush()
        except (ValueError, OSError):
            pass
        os.dup2(self._original, 2)
        os.close(self._write_end)
        self._thread.join(timeout=5)


_installed: _StderrFilter | None = None


def quiet_native_logs(verbose: bool = False) -> None:
    """Keep TensorFlow's native chatter (cuInit on a machine without a GPU, NodeDef notices) off stderr.

    With `verbose`, everything TensorFlow says is shown, its info lines included. Call before
    TensorFlow is imported; calling again does nothing.
    """
    global _installed
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _installed is None:
        _installed = _StderrFilter()


def stream_is_terminal(stream: TextIO) -> bool:
    """Whether `stream` reaches a terminal, also while stderr runs through the noise filter's pipe."""
    if stream is sys.stderr and _installed is not None:
        return _installed.terminal
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ProgressBar:
    """Progress over a count: redrawn in place on a terminal; on a file or pipe, a plain line every `every_s` seconds.

    A log file then reads `decoding images: 1280/2000 images, 3.1 s` lines instead of one long
    line of carriage returns. Silent for work that fits one step.
    """

    def __init__(
        self,
        total: int,
        unit: str = "images",
        stream: TextIO | None = None,
        width: int = 30,
        title: str = "",
        every_s: float = 10.0,
        interactive: bool | None = None,
    ):
        self.total, self.unit, self.width, self.title, self.every_s = total, unit, width, title, every_s
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            interactive = stream_is_terminal(self.stream)
        self.interactive = interactive
        self.done = 0
        self.started = self._last_line = time.monotonic()

    def add(self, count: int = 1) -> None:
        self.advance(count)

    def advance(self, count: int) -> None:
        self.done = min(self.total, self.done + count)
        if self.done == count and self.done == self.total:
            return  # one step did everything: no bar to watch
        finished = self.done >= self.total
        elapsed = time.monotonic() - self.started
        if self.interactive:
            filled = int(self.width * self.done / max(self.total, 1))
            prefix = f"{self.title}: " if self.title else ""
            self.stream.write(
                f"\r  {prefix}[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {self.unit} "
                f"{elapsed:.1f}s{chr(10) if finished else ''}"
            )
        elif finished or time.monotonic() - self._last_line >= self.every_s:
            self._last_line = time.monotonic()
            prefix = f"{self.title}: " if self.title else ""
            self.stream.write(f"  {prefix}{self.done}/{self.total} {self.unit}, {elapsed:.1f} s\n")
        self.stream.flush()
