"""Runtime settings left at "auto": intra-op threads, inference workers and the lone-request session, per model.

onnxruntime's own defaults give one batch every core. That suits a model whose run is small
beside what a request costs the service (parsing, decoding, answering): one batch at a time keeps
up, and its threads barely run. A model that costs milliseconds per image does better with
one-thread batches side by side, one per core, because a batch split over several threads stalls
at every step of the graph whenever HTTP or decoding preempts one of them; a second session with
every core then answers a request that arrives at an idle model as fast as one batch on all cores
would. The model's cost is measured once at load, on the session the service creates first.
Explicit values (flags, environment, a model's settings.toml) are never changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .settings import AUTO, Settings

# Above this many milliseconds per image (one image, every core), a model's batches run one thread
# each, side by side. The README's "CPU threads" gives the measurements it comes from: digits and
# the CIFAR-10 CNN cost well under it and serve alike either way; MobileNetV2 costs several times it
# and serves a fifth more images per second with one-thread batches.
HEAVY_MS_PER_IMAGE = 2.0
AUTO_FIELDS = ("intra_op_threads", "inference_workers", "lone_request_threads")


@dataclass(frozen=True)
class Choice:
    """The settings in force after "auto" is resolved, and why."""

    settings: Settings
    ms_per_image: float
    reason: str


def has_auto(settings: Settings) -> bool:
    return any(getattr(settings, name) == AUTO for name in AUTO_FIELDS)


def first_threads(settings: Settings, cpus: int) -> int:
    """Intra-op threads of the session created before the model's cost is known: the explicit value, else every core."""
    threads = settings.intra_op_threads
    return threads if isinstance(threads, int) else cpus


def ms_per_image(run: Callable[[np.ndarray], np.ndarray], input_shape: tuple[int, int, int], repeats: int = 3) -> float:
    """The quickest of a few runs of one image, in milliseconds: the model's cost with the machine at its least busy."""
    image = np.zeros((1, *input_shape), dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        run(image)
        best = min(best, time.perf_counter() - began)
    return best * 1000


def choose(settings: Settings, cpus: int, cuda: bool, cost_ms: float) -> Choice:
    """`settings` with every "auto" runtime field replaced by a number, from the machine and the model's cost.

    CUDA: one session with every core for what runs on the CPU, one batch at a time (the GPU
    serialises them anyway), no lone-request session. CPU, one core or a model cheaper than
    HEAVY_MS_PER_IMAGE: one batch at a time on every core, no lone-request session. CPU, a heavier
    model: one-thread batches, one per core, and a lone-request session with every core.
    """
    heavy = not cuda and cpus > 1 and cost_ms >= HEAVY_MS_PER_IMAGE
    explicit_threads = settings.intra_op_threads if isinstance(settings.intra_op_threads, int) else None
    workers: int
    if isinstance(settings.inference_workers, int):
        workers = settings.inference_workers
    else:
        workers = max(1, cpus // (explicit_threads or 1)) if heavy else 1
    threads = explicit_threads
    if threads is None:
        threads = max(1, cpus // workers) if heavy else cpus
    lone = settings.lone_request_threads
    if not isinstance(lone, int):
        lone = cpus if heavy and 0 < threads < cpus else 0
    if cuda:
        kind = "on CUDA"
    elif cpus == 1:
        kind = "on one CPU core"
    else:
        kind = f"{'at or above' if heavy else 'below'} {HEAVY_MS_PER_IMAGE:g} ms per image, on {cpus} CPU cores"
    resolved = settings.model_copy(
        update={"intra_op_threads": threads, "inference_workers": min(workers, 64), "lone_request_threads": lone}
    )
    return Choice(resolved, cost_ms, f"{cost_ms:.2f} ms per image ({kind})")
