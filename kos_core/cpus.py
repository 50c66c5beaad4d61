"""How many CPUs this process may really use: its affinity and its container's CPU quota, not the host's cores.

In a container limited to 2 CPUs on a 64-core host, `os.cpu_count()` says 64; a pool sized by it
runs 64 threads that the kernel throttles to 2 CPUs' worth of time, which costs latency.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """The process's cgroup path per controller ('' for cgroup v2's unified hierarchy), from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _candidates(base: Path, own: str | None) -> list[Path]:
    """The process's own cgroup folder first (when it is visible here), then the mount's root, as containers show it."""
    folders = []
    if own and own != "/":
        folders.append(base / own.lstrip("/"))
    folders.append(base)
    return folders


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota as a number of CPUs (1.5 for `150000 100000`), or None when there is no limit."""
    own = _own_cgroup_paths(proc_cgroup)
    # cgroup v2: cpu.max holds "<quota> <period>" or "max <period>".
    for folder in _candidates(root, own.get("")):
        text = _read(folder / "cpu.max")
        if text is not None:
            quota, _, period = text.partition(" ")
            if quota == "max":
                return None
            try:
                return int(quota) / int(period or "100000")
            except (ValueError, ZeroDivisionError):
                return None
    # cgroup v1: cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us, under cpu or cpu,cpuacct.
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for folder in _candidates(root / mount, own.get("cpu")):
            quota_text, period_text = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota_text is None or period_text is None:
                continue
            try:
                quota_us, period_us = int(quota_text), int(period_text)
            except ValueError:
                return None
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: the fewest of its affinity mask and its cgroup quota (rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        # A quota of 1.5 CPUs lets two threads run most of the time; rounding down would leave half a CPU idle.
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def quota_limited_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """`available_cpus()` when a cgroup quota holds the process to fewer CPUs than it sees; None otherwise.

    For libraries that size their own pools by the host's cores (onnxruntime): left alone when
    nothing limits them, told this count when a quota would throttle their extra threads.
    """
    try:
        seen = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        seen = os.cpu_count() or 1
    cpus = available_cpus(root, proc_cgroup)
    return cpus if cpus < seen else None
