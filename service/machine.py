"""What the machine offers the service at start-up: a GPU device node, the CPUs, and so how many front ends to run.

Kept free of onnxruntime and the web stack, so that the supervisor of `--frontends N`, which
serves no request itself, stays a small process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kos_core.cpus import available_cpus

# Front ends the automatic choice never goes past: each is a process of about 100 MiB.
MAX_AUTOMATIC_FRONTENDS = 8


def gpu_present(dev: Path = Path("/dev")) -> bool:
    """Whether this machine (or container) shows an NVIDIA GPU device node."""
    return any(dev.glob("nvidia[0-9]*")) or (dev / "dxg").exists()


def automatic_frontends(cpus: int, cuda: bool, linux: bool = True) -> tuple[int, str]:
    """How many front-end processes `--frontends 0` (automatic, the default) runs, and why, in words.

    The rule, from benchmarks/frontends_bench.py on a 2-core machine (the README and
    docs/architecture.md give the figures): with the common upload parsed by the service's own
    fast path, one process on two cores served the CIFAR-10 CNN 9 % faster than two front ends
    (826 against 757 requests/s at concurrency 32), whose owner then lacked the CPU its inference
    needs; only a model far cheaper than HTTP (the 8x8 digits) gained from them (+24 %). So: one
    process up to two CPUs on a CPU device; beyond, front ends on half the CPUs (at least 2), the
    inference threads having the others; on a CUDA device, where the inference process mostly
    waits for the GPU, front ends on every CPU but one (at least 2). At most MAX_AUTOMATIC_FRONTENDS.
    """
    if not linux:
        return 1, "not Linux: front ends need a shared listening socket and /dev/shm"
    if cpus <= 1:
        return 1, "1 CPU available: one process does everything"
    if not cuda and cpus <= 2:
        return 1, f"{cpus} CPUs available on a CPU device: one process (front ends would take the inference's CPU)"
    wanted = cpus - 1 if cuda else cpus // 2
    count = min(MAX_AUTOMATIC_FRONTENDS, max(2, wanted))
    rule = "every CPU but one, for a CUDA device" if cuda else "half the CPUs, for a CPU device"
    return count, f"{cpus} CPUs available: {rule} (at least 2, at most {MAX_AUTOMATIC_FRONTENDS})"


def choose_frontends(frontends: int, device: str) -> tuple[int, str]:
    """`--frontends` as set (N forces N), or the automatic choice for 0: (count, why)."""
    if frontends:
        return frontends, f"--frontends {frontends}"
    cuda = device == "cuda" or (device == "auto" and gpu_present())
    count, why = automatic_frontends(available_cpus(), cuda, sys.platform.startswith("linux"))
    return count, f"--frontends 0 (automatic): {why}"
