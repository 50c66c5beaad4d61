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
    """How many front-end processes `--frontends 0` (automatic) runs, and why, in words.

    The rule, from benchmarks/frontends_bench.py on a 2-core machine (the README and
    docs/architecture.md give the figures): one process parses HTTP on one Python core, which
    caps a small model's requests per second; two front ends served about a sixth more images per
    second at concurrency 32 and cost about 0.5 ms at concurrency 1 (a hop to the inference
    process). So: one process on one CPU, where a second process could only take turns with the
    first; on a CPU device, front ends on half the CPUs (at least 2), since the inference threads
    need the others; on a CUDA device, where the inference process mostly waits for the GPU, front
    ends on every CPU but one (at least 2). At most MAX_AUTOMATIC_FRONTENDS either way.
    """
    if not linux:
        return 1, "not Linux: front ends need a shared listening socket and /dev/shm"
    if cpus <= 1:
        return 1, "1 CPU available: one process does everything"
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
