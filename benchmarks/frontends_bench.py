"""`--frontends 1` beside `--frontends N`: images per second and the service's CPU, in one run.

Both services serve the same model repository at their defaults (only --frontends differs), and
wrk uploads the same real JPEG files (one per request, benchmarks/multipart.lua) at one
concurrency, in alternating rounds (A B B A ...), so that drift in the machine's load hits both
alike. Beside each figure: the CPU time of the service's whole process tree (supervisor, owner,
front ends) over the round, in cores, and wrk's own share of the machine.

    python benchmarks/frontends_bench.py                            # digits, c=32, 1 vs 2, 4 rounds of 6 s
    python benchmarks/frontends_bench.py --frontends 1,2,3 --duration 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from serve_bench import ROOT, alternating_rounds, make_jpegs, start_service, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="digits",
        help="a model of --repository; uploads: digits for digits, 32x32 photos for cifar10, else 320x240",
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--frontends", default="1,2", help="comma-separated --frontends values to compare")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per round and target")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "frontends_bench.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="frontends-bench-"))
    manifest = work / "manifest.txt"
    manifest.write_text("\n".join(str(p) for p in make_jpegs(args.model, work / "jpegs", 64)) + "\n")
    targets = [int(n) for n in args.frontends.split(",")]
    servers = {}
    try:
        for n in targets:
            process, port = start_service(args.repository, ["--frontends", str(n)])
            servers[n] = (process, f"http://127.0.0.1:{port}/predict/{args.model}")
        by_concurrency = alternating_rounds(servers, manifest, [args.concurrency], args.rounds, args.duration)
    finally:
        for process, _ in servers.values():
            stop(process)
    results = {n: by_concurrency[n][args.concurrency] for n in targets}
    print(f"\n{args.model}, concurrency {args.concurrency}, {args.rounds} rounds of {args.duration:g} s, {os.cpu_count()} CPUs")
    print(f"{'--frontends':>11s} {'req/s (median)':>15s} {'each round':>30s} {'p50 ms':>7s} {'p99 ms':>7s} {'service CPU':>12s}")
    summary = {}
    for n, rounds in results.items():
        rates = [r["requests_per_s"] for r in rounds]
        summary[n] = {
            "requests_per_s": statistics.median(rates),
            "rounds": rounds,
            "service_cores": statistics.median(r["service_cores"] for r in rounds),
        }
        print(
            f"{n:>11d} {statistics.median(rates):>15.1f} {' '.join(f'{r:.0f}' for r in rates):>30s} "
            f"{statistics.median(r['p50_ms'] for r in rounds):>7.2f} {statistics.median(r['p99_ms'] for r in rounds):>7.2f} "
            f"{summary[n]['service_cores']:>7.2f} cores"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": args.model, "concurrency": args.concurrency, "results": summary}, indent=2))


if __name__ == "__main__":
    main()
