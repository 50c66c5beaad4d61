"""onnxruntime sessions with the execution providers the settings ask for, and what they really got."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

from .settings import Settings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceUnavailable(RuntimeError):
    """The settings demand CUDA and onnxruntime cannot give it."""


def requested_providers(device: str) -> list[str]:
    if device == "cpu":
        return [CPU]
    if CUDA not in ort.get_available_providers():
        if device == "cuda":
            raise DeviceUnavailable(
                "device=cuda but this onnxruntime build has no CUDAExecutionProvider: install onnxruntime-gpu"
            )
        return [CPU]
    return [CUDA, CPU]


def create_session(path: Path, settings: Settings) -> ort.InferenceSession:
    """A session on the requested device; raises DeviceUnavailable if device=cuda silently fell back."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime logs a loud warning when CUDA libraries are missing; the fall-back is reported in /health.
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=requested_providers(settings.device))
    got = session.get_providers()
    if settings.device == "cuda" and CUDA not in got:
        raise DeviceUnavailable(
            f"device=cuda but onnxruntime could not start CUDA for {path} (got {got}); "
            "check the NVIDIA driver, CUDA and cuDNN libraries"
        )
    if settings.device == "auto" and CUDA not in got:
        log.info("serving %s on CPU: CUDA is not available here", path)
    return session
