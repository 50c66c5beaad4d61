"""CPU count from the container's cgroup quota and the affinity mask, on fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kos_core.cpus import available_cpus, cgroup_cpu_limit, quota_limited_cpus


def _tree(root: Path, files: dict[str, str], proc: str = "0::/\n") -> tuple[Path, Path]:
    for name, text in files.items():
        path = root / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "cgroup").mkdir(parents=True, exist_ok=True)
    proc_file = root / "proc_cgroup"
    proc_file.write_text(proc)
    return root / "cgroup", proc_file


@pytest.fixture
def many_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


def test_cgroup_v2_quota_is_read_as_cpus(tmp_path, many_cores):
    root, proc = _tree(tmp_path, {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert available_cpus(root, proc) == 2  # 1.5 CPUs keep two threads busy most of the time


def test_cgroup_v2_without_a_quota_leaves_the_affinity(tmp_path, many_cores):
    root, proc = _tree(tmp_path, {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(root, proc) == 64


def test_cgroup_v2_reads_the_processes_own_cgroup_first(tmp_path, many_cores):
    root, proc = _tree(
        tmp_path,
        {"cpu.max": "max 100000\n", "kubepods/pod1/ctr/cpu.max": "400000 100000\n"},
        proc="0::/kubepods/pod1/ctr\n",
    )
    assert available_cpus(root, proc) == 4


def test_cgroup_v1_quota_and_period(tmp_path, many_cores):
    root, proc = _tree(
        tmp_path,
        {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
        proc="4:cpu,cpuacct:/\n0::/\n",
    )
    assert cgroup_cpu_limit(root, proc) == 3
    assert available_cpus(root, proc) == 3


def test_cgroup_v1_without_a_quota(tmp_path, many_cores):
    root, proc = _tree(
        tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, proc="1:cpu:/docker/abc\n"
    )
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(root, proc) == 64


def test_the_affinity_mask_wins_over_a_larger_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    root, proc = _tree(tmp_path, {"cpu.max": "800000 100000\n"})
    assert available_cpus(root, proc) == 2


def test_a_tiny_quota_still_gives_one_cpu_and_no_cgroup_files_mean_no_limit(tmp_path, many_cores):
    root, proc = _tree(tmp_path, {"cpu.max": "10000 100000\n"})
    assert available_cpus(root, proc) == 1
    empty, proc = _tree(tmp_path / "none", {})
    assert cgroup_cpu_limit(empty, proc) is None and available_cpus(empty, proc) == 64


def test_this_machine_gives_a_sane_count():
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


def test_only_a_quota_below_what_the_process_sees_is_reported_for_pools_sized_by_the_host(tmp_path, many_cores):
    root, proc = _tree(tmp_path, {"cpu.max": "200000 100000\n"})
    assert quota_limited_cpus(root, proc) == 2
    (root / "cpu.max").write_text("max 100000\n")
    assert quota_limited_cpus(root, proc) is None
