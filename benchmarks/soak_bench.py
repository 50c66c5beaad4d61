"""Memory under a long steady load: resident memory of every process of the service, sampled over the run.

Starts `python -m service` in each shape asked for (`--frontends 1`: one process; `--frontends 2`:
the supervisor, the owner of the models and two front ends), loads it with wrk (one real JPEG per
multipart request, benchmarks/multipart.lua) at one concurrency for the whole run, and reads each
process's resident memory (VmRSS in /proc) every `--sample-s` seconds. The first sample is taken
after a warm-up under the same load, so that what the first requests allocate once (buffers,
caches, the arenas of the decoder and of onnxruntime) is not counted as growth. Printed per
process: its role, resident memory after the warm-up, at the end, its peak, the growth from the
first sample to the mean of the last three, and the growth over the second half of the run (a
leak grows all along; a one-time step early on does not); and the requests served. Writes JSON.

    python benchmarks/soak_bench.py                              # digits, 1 and 2 front ends, 10 minutes each
    python benchmarks/soak_bench.py --model cifar10 --frontends 2 --minutes 3

The goal (the performance issue): flat, under 5 % growth over a 10-minute run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import LUA, ROOT, make_jpegs, model_file, progress, start_service, stop, tree


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def role(pid: int, root: int, frontends: int) -> str:
    """What the process is: the one service process, or the supervisor, the owner or a front end."""
    if pid == root:
        return "service" if frontends == 1 else "supervisor"
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    if "owner" in words:
        return "owner"
    if "frontend" in words:
        return f"front end {words[words.index('--index') + 1]}" if "--index" in words else "front end"
    return " ".join(words)[-40:]


def soak(name: str, frontends: int, args: argparse.Namespace, work: Path) -> dict:
    path = model_file(name, args.cache)
    repository = work / f"repository-{frontends}"
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "1" / "model.onnx").write_bytes(path.read_bytes())
    jpegs = make_jpegs(name, work / "images", 64)
    manifest = work / "manifest.txt"
    manifest.write_text("\n".join(str(p) for p in jpegs) + "\n")
    process, port = start_service(repository, ["--frontends", str(frontends)])
    seconds = args.warmup_s + args.minutes * 60
    wrk = subprocess.Popen(
        ["wrk", "-t1", f"-c{args.concurrency}", f"-d{round(seconds)}s", "--timeout", "30s", "-s", str(LUA)]
        + [f"http://127.0.0.1:{port}/predict/{name}", "--", str(manifest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    samples: dict[int, list[tuple[float, int]]] = {}
    roles: dict[int, str] = {}
    try:
        time.sleep(args.warmup_s)
        began = time.monotonic()
        while wrk.poll() is None:
            now = time.monotonic() - began
            for pid in tree(process.pid):
                kib = rss_kib(pid)
                if kib is not None:
                    samples.setdefault(pid, []).append((now, kib))
                    roles.setdefault(pid, role(pid, process.pid, frontends))
            progress(
                f"--frontends {frontends}: {now / 60:4.1f} min, resident "
                + ", ".join(f"{roles[pid]} {points[-1][1] / 1024:.0f} MiB" for pid, points in samples.items())
            )
            time.sleep(args.sample_s)
        output = wrk.communicate()[0]
    finally:
        if wrk.poll() is None:
            wrk.kill()
        stop(process)
    served = next((line.split()[-1] for line in output.splitlines() if line.startswith("Requests/sec")), "?")
    non_2xx = next((line.split()[-1] for line in output.splitlines() if "Non-2xx" in line), "0")
    processes = []
    for pid, points in samples.items():
        if len(points) < 4:
            continue  # a process that came or went during the run (none should)
        first = points[0][1]
        last = statistics.mean(kib for _, kib in points[-3:])
        # A leak grows all along; a one-time step (a new thread's arena, the first batch of a new
        # size) does not: the second half of the run tells them apart.
        middle = points[len(points) // 2][1]
        processes.append(
            {
                "pid": pid,
                "role": roles[pid],
                "first_mib": first / 1024,
                "last_mib": last / 1024,
                "peak_mib": max(kib for _, kib in points) / 1024,
                "growth_percent": 100 * (last - first) / first,
                "second_half_growth_percent": 100 * (last - middle) / middle,
                "samples": points,
            }
        )
    return {"frontends": frontends, "requests_per_s": served, "non_2xx": non_2xx, "processes": processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="digits, cifar10 or mobilenet")
    parser.add_argument("--frontends", default="1,2", help="comma-separated --frontends values, one soak each")
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of load measured per shape")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="seconds of the same load before the first sample")
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-cache")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "soak_bench.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="soak-bench-") as folder:
        for n in [int(v) for v in args.frontends.split(",")]:
            results.append(soak(args.model, n, args, Path(folder) / f"f{n}"))
    print(
        f"\n{args.model}, concurrency {args.concurrency}, {args.minutes:g} minutes after {args.warmup_s:g} s of warm-up, {os.cpu_count()} CPUs"
    )
    print(f"{'shape':<14}{'process':<18}{'first MiB':>10}{'last MiB':>10}{'peak MiB':>10}{'growth':>9}{'2nd half':>10}")
    for result in results:
        for p in result["processes"]:
            print(
                f"--frontends {result['frontends']:<3}{p['role']:<18}{p['first_mib']:>10.1f}{p['last_mib']:>10.1f}"
                f"{p['peak_mib']:>10.1f}{p['growth_percent']:>8.2f}%{p['second_half_growth_percent']:>9.2f}%"
            )
        print(f"  served {result['requests_per_s']} requests/s, non-2xx answers: {result['non_2xx']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "minutes": args.minutes, "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
