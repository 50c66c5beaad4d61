"""onnxruntime sessions with the execution providers the settings ask for, and what they really got."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import onnxruntime as ort

from kos_core.cpus import available_cpus, quota_limited_cpus

from .machine import gpu_present
from .settings import AUTO, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# A one-node ONNX graph (y = Relu(x), float[1], opset 13), small enough to keep inline: it shows
# whether CUDA really starts before any model is loaded. onnxruntime-gpu lists the CUDA provider
# even where the CUDA libraries are missing, and silently falls back to CPU when creating a session.
_PROBE_MODEL = bytes.fromhex(
    "08083a370a0c0a0178120179220452656c75120570726f62655a0f0a0178120a0a08080112040a020801620f0a0179"
    "120a0a08080112040a02080142040a00100d"
)


class DeviceUnavailable(RuntimeError):
    """The settings demand CUDA and onnxruntime cannot give it."""


@dataclass(frozen=True)
class Device:
    """The providers every session is created with, decided once at start-up."""

    providers: tuple[str, ...]
    reason: str
    # True when the fall-back deserves a warning: a GPU is there but CUDA does not work on it.
    worrying: bool = False

    @property
    def is_cuda(self) -> bool:
        return CUDA in self.providers


def cuda_problem() -> str | None:
    """Why CUDA cannot run here, or None when a session really runs on it."""
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    options = ort.SessionOptions()
    options.log_severity_level = 4
    previous = 2  # onnxruntime's default; it has no getter
    # onnxruntime prints the missing libraries in colour on stderr, outside any log format; the
    # reason is reported once, in plain words, by the caller (and in /health).
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(_PROBE_MODEL, sess_options=options, providers=[CUDA, CPU])
        if CUDA not in session.get_providers():
            return "onnxruntime could not start CUDA (check the NVIDIA driver and the CUDA and cuDNN libraries)"
        session.run(None, {"x": np.ones(1, dtype=np.float32)})
    except Exception as exc:  # a broken driver shows up here rather than in the first request
        return f"CUDA failed a test run: {type(exc).__name__}: {exc}"
    finally:
        ort.set_default_logger_severity(previous)
    return None


def resolve_device(device: str) -> Device:
    """The providers for `device`: `cuda` raises DeviceUnavailable without a working CUDA, `auto` falls back to CPU."""
    if device == "cpu":
        return Device((CPU,), "device=cpu")
    problem = cuda_problem()
    if problem is None:
        return Device((CUDA, CPU), f"device={device}: CUDA works")
    if device == "cuda":
        raise DeviceUnavailable(f"device=cuda but {problem}")
    if not gpu_present():
        # On auto, a machine without a GPU is the normal case for a CPU deployment: not a problem.
        return Device((CPU,), f"device=auto: serving on CPU because this machine has no NVIDIA GPU (no /dev/nvidia*; {problem})")
    return Device((CPU,), f"device=auto: serving on CPU because {problem}", worrying=True)


def create_session(
    path: Path,
    settings: Settings,
    device: Device,
    intra_op_threads: int | Literal["auto"] | None = None,
    spinning: bool | None = None,
) -> ort.InferenceSession:
    """A session on `device`; raises DeviceUnavailable if a CUDA session silently fell back to CPU.

    `intra_op_threads` and `spinning` override the settings (for the lone-request session).
    """
    spinning = settings.intra_op_spinning if spinning is None else spinning
    options = ort.SessionOptions()
    threads = settings.intra_op_threads if intra_op_threads is None else intra_op_threads
    if threads == AUTO:  # not resolved yet (the registry resolves it per model): every core the process may use
        threads = available_cpus()
    # 0 lets onnxruntime size its pool by the host's cores; in a container with a CPU quota that
    # oversubscribes what the quota allows, so it gets the quota's count instead.
    options.intra_op_num_threads = threads or quota_limited_cpus() or 0
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle onnxruntime threads spin by default; in a server they would burn the cores that decode
    # images and parse HTTP between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    # onnxruntime logs a loud warning when CUDA libraries are missing; the device is reported in /health.
    options.log_severity_level = 3
    session = at_lower_priority(
        settings.inference_nice,
        lambda: ort.InferenceSession(str(path), sess_options=options, providers=list(device.providers)),
    )
    got = session.get_providers()
    if device.is_cuda and CUDA not in got:
        raise DeviceUnavailable(f"onnxruntime could not start CUDA for {path} (got {got})")
    return session


def warmup_batch_sizes(max_batch_size: int, device: Device) -> list[int]:
    """Batch sizes to run once before serving.

    On CUDA every new input shape triggers a slow kernel search, so batches are padded to powers
    of two (and the maximum) and each of those is warmed. On CPU the largest batch sizes the
    memory arena and the smallest is the common case at low load.
    """
    if device.is_cuda:
        return padded_sizes(max_batch_size)
    return sorted({1, max_batch_size})


def padded_sizes(max_batch_size: int) -> list[int]:
    sizes = {2**i for i in range(max_batch_size.bit_length()) if 2**i <= max_batch_size}
    return sorted(sizes | {max_batch_size})


def pad_size(size: int, max_batch_size: int) -> int:
    """The smallest warmed batch size that holds `size` images."""
    return next(s for s in padded_sizes(max_batch_size) if s >= size)


def name_os_thread(name: str) -> None:
    """Name the calling thread where the OS shows it (`top -H`, `ps -L`, py-spy; Linux, 15 bytes at most).

    Threads a thread starts take its name, so onnxruntime's pool threads carry the name of the
    thread that created their session.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])
    except OSError:  # a read-only /proc: the threads keep the process's name
        pass


def inference_thread_setup(increment: int) -> None:
    """What each inference thread does first: its OS name, and its priority below the event loops'."""
    name_os_thread("kos-infer")
    lower_thread_priority(increment)


def lower_thread_priority(increment: int) -> None:
    """Lower the calling thread's CPU priority `increment` nice steps below the process's (Linux; elsewhere nothing).

    Inference threads run below the event loops, which parse requests, answer refusals and feed
    the batches: when the cores are short, HTTP goes first and batches take what is left (and
    grow), rather than every connection waiting behind a batch. Raising a thread's nice value needs
    no privilege, and the threads it starts inherit it.
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, base + increment))
    except OSError as exc:  # a sandbox that forbids it: serve at equal priority
        log.warning("could not lower the inference threads' priority: %s", exc)


def at_lower_priority(increment: int, make: Callable[[], T]) -> T:
    """`make()` on a new thread at lower priority, so that the threads it starts (onnxruntime's pool) inherit it.

    A new thread each time, since an unprivileged thread cannot raise its priority back.
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return make()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            name_os_thread("kos-onnxruntime")
            lower_thread_priority(increment)
            outcome.append(make())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name="session-create")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
