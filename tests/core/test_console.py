"""What the offline tools print: native start-up noise filtered unless verbose, progress as plain lines in a log."""

from __future__ import annotations

import io
import subprocess
import sys

from kos_core.console import ProgressBar, is_native_noise
from tests.conftest import ROOT

CUINIT = (
    "E0000 00:00:1796497977.090856    6706 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)"
)
NODEDEF = (
    "E0000 00:00:1796497980.567904    6706 node_def_util.cc:682] NodeDef mentions attribute use_unbounded_threadpool "
    "which is not in the op definition"
)
REAL_ERROR = "E0000 00:00:1796497980.567904    6706 gpu_device.cc:12] out of memory allocating 4GB"


def test_tensorflow_start_up_lines_are_noise_and_real_errors_are_not():
    assert is_native_noise(CUINIT) and is_native_noise(NODEDEF)
    assert is_native_noise("I0000 00:00:1796497973.467244    6706 cudart_stub.cc:31] Could not find cuda drivers")
    assert not is_native_noise(REAL_ERROR)
    assert not is_native_noise("error: recipe cifar10: unknown option") and not is_native_noise("Traceback (most recent")


_WRITER = f"""
import os, sys
from kos_core.console import quiet_native_logs
quiet_native_logs(verbose=sys.argv[1] == "verbose")
# Written on file descriptor 2 directly, as TensorFlow's C++ logging does, past Python's sys.stderr.
os.write(2, ({CUINIT!r} + "\\n" + {NODEDEF!r} + "\\n" + {REAL_ERROR!r} + "\\n").encode())
print("error: something the user must read", file=sys.stderr)
raise SystemExit("the last words")
"""


def _write_native_lines(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WRITER, mode], cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)}
    )


def test_native_noise_is_kept_off_stderr_and_everything_else_passes():
    result = _write_native_lines("quiet")
    assert result.returncode == 1
    assert "cuInit" not in result.stderr and "NodeDef" not in result.stderr
    assert "out of memory allocating 4GB" in result.stderr
    assert "error: something the user must read" in result.stderr and result.stderr.rstrip().endswith("the last words")


def test_verbose_shows_the_native_lines():
    result = _write_native_lines("verbose")
    assert "failed call to cuInit" in result.stderr and "NodeDef mentions attribute" in result.stderr


def test_progress_in_a_log_file_is_plain_periodic_lines():
    log = io.StringIO()
    bar = ProgressBar(1000, stream=log, title="decoded", every_s=0.0, interactive=False)
    for _ in range(4):
        bar.advance(250)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(",")[0] for line in lines] == [f"  decoded: {n}/1000 images" for n in (250, 500, 750, 1000)]


def test_progress_in_a_log_file_waits_its_period_but_always_says_the_end():
    log = io.StringIO()
    bar = ProgressBar(100, stream=log, every_s=3600, interactive=False)
    for _ in range(10):
        bar.advance(10)
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[-1]] and "100/100 images" in log.getvalue()


def test_progress_on_a_terminal_is_one_bar_redrawn_in_place():
    screen = io.StringIO()
    bar = ProgressBar(4, stream=screen, interactive=True)
    for _ in range(4):
        bar.advance(1)
    assert screen.getvalue().count("\r") == 4 and screen.getvalue().count("\n") == 1 and "[" in screen.getvalue()
