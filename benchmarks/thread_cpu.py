"""Where the service's CPU goes under load: CPU time per thread name, per request.

Serves one model of a repository with `python -m service` at its defaults (or `--service-args`),
loads it with wrk at one concurrency (one real JPEG per multipart request, as serve_bench.py),
and reads every thread's user and system time from /proc before and after. The service names its
threads (kos-infer: inference workers; kos-onnxruntime: onnxruntime's pool threads; kos-decode:
the decode pool); the rest carry the process's name, the event loop's thread among them. Prints
each name's share of the cores and its CPU milliseconds per request, the mean batch size over the
run (from /metrics), and the total. Linux only.

    python benchmarks/thread_cpu.py --model cifar10 --repository runs/bench-cache/models
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from serve_bench import ROOT, make_jpegs, run_wrk, start_service, stop, tree


def thread_times(pid: int) -> dict[tuple[int, int], tuple[str, int, int]]:
    """(process, thread) → (name, user ticks, system ticks) for every thread of `pid`'s process tree."""
    found = {}
    for process in tree(pid):
        for task in Path(f"/proc/{process}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            found[(process, int(task.name))] = (name, int(fields[11]), int(fields[12]))
    return found


def batch_totals(port: int) -> tuple[float, float]:
    """The service's batch-size histogram: (sum, count) over every model."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals = {"kos_batch_size_sum": 0.0, "kos_batch_size_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["kos_batch_size_sum"], totals["kos_batch_size_count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="a model of --repository; uploads as in serve_bench.py")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured, after 3 s of warm-up load")
    parser.add_argument("--service-args", default="", help="flags for python -m service")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("thread CPU times are read from /proc: Linux only")
    work = Path(tempfile.mkdtemp(prefix="thread-cpu-"))
    manifest = work / "manifest.txt"
    manifest.write_text("\n".join(str(p) for p in make_jpegs(args.model, work / "jpegs", 64)) + "\n")
    process, port = start_service(args.repository, args.service_args.split())
    url = f"http://127.0.0.1:{port}/predict/{args.model}"
    try:
        run_wrk(url, manifest, args.concurrency, 3, 1)
        before, batches_before = thread_times(process.pid), batch_totals(port)
        began = time.perf_counter()
        figures, wrk_share = run_wrk(url, manifest, args.concurrency, args.duration, 1)
        wall = time.perf_counter() - began
        after, batches_after = thread_times(process.pid), batch_totals(port)
    finally:
        stop(process)
    hz = os.sysconf("SC_CLK_TCK")
    requests = figures["requests_per_s"] * wall
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0])
    for key, (name, user, system) in after.items():
        if key in before:  # threads that lived through the whole run
            _, user0, system0 = before[key]
            by_name[name][0] += (user - user0) / hz
            by_name[name][1] += (system - system0) / hz
            by_name[name][2] += 1
    print(
        f"{args.model}, c={args.concurrency}, {args.duration:g} s: {figures['requests_per_s']:.1f} req/s, "
        f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, errors {figures['errors']}, "
        f"wrk {wrk_share:.1%} of the machine"
    )
    print(f"{'thread name':18s} {'threads':>7s} {'cores':>6s} {'user':>6s} {'system':>6s} {'CPU ms/request':>14s}")
    total = 0.0
    for name, (user, system, count) in sorted(by_name.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        cpu = user + system
        total += cpu
        if cpu > 0:
            print(
                f"{name:18s} {count:7d} {cpu / wall:6.2f} {user / wall:6.2f} {system / wall:6.2f} {1000 * cpu / requests:14.3f}"
            )
    print(f"{'all':18s} {'':7s} {total / wall:6.2f} {'':6s} {'':6s} {1000 * total / requests:14.3f}")
    images = batches_after[0] - batches_before[0]
    count = batches_after[1] - batches_before[1]
    if count:
        print(f"onnxruntime runs: {count:.0f}, {images / count:.1f} images each on average")


if __name__ == "__main__":
    main()
