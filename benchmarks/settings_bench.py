"""Service settings side by side on one model: images per second, latency and the service's CPU, in one run.

Each setting is a set of `python -m service` flags (empty: the service's defaults); every service
serves the same model, and wrk uploads the same real JPEG files (one per request,
benchmarks/multipart.lua) at each concurrency in alternating rounds (A B B A ...), so drift in
the machine's load hits all alike. The models are serve_bench's (digits, cifar10, mobilenet).

    python benchmarks/settings_bench.py --model cifar10 \\
        --setting auto= --setting 'one-batch=--intra-op-threads 2 --inference-workers 1 --lone-request-threads 0'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from serve_bench import MODELS, ROOT, alternating_rounds, make_jpegs, model_file, start_service, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", choices=MODELS)
    parser.add_argument("--setting", action="append", required=True, help="NAME=FLAGS; repeat for each setting")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated connection counts")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per round, setting and concurrency")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-cache", help="where serve_bench keeps its models")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "settings_bench.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="settings-bench-"))
    repository = work / "repository"
    (repository / args.model / "1").mkdir(parents=True)
    (repository / args.model / "1" / "model.onnx").symlink_to(model_file(args.model, args.cache).resolve())
    manifest = work / "manifest.txt"
    manifest.write_text("\n".join(str(p) for p in make_jpegs(args.model, work / "jpegs", 64)) + "\n")
    settings = dict(s.split("=", 1) for s in args.setting)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    servers = {}
    try:
        for name, flags in settings.items():
            process, port = start_service(repository, flags.split())
            servers[name] = (process, f"http://127.0.0.1:{port}/predict/{args.model}")
        results = alternating_rounds(servers, manifest, concurrencies, args.rounds, args.duration)
    finally:
        for process, _ in servers.values():
            stop(process)
    print(f"\n{args.model}, {args.rounds} rounds of {args.duration:g} s, {os.cpu_count()} CPUs (medians)")
    print(f"{'setting':>12s} {'conc':>4s} {'img/s':>8s} {'each round':>30s} {'p50 ms':>7s} {'p99 ms':>7s} {'CPU':>10s}  flags")
    summary: dict[str, dict[int, dict]] = {}
    for name, by_c in results.items():
        for c, rounds in by_c.items():
            rates = [r["requests_per_s"] for r in rounds]
            row = {
                "requests_per_s": statistics.median(rates),
                "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
                "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
                "service_cores": statistics.median(r["service_cores"] for r in rounds),
                "rounds": rounds,
            }
            summary.setdefault(name, {})[c] = row
            print(
                f"{name:>12s} {c:4d} {row['requests_per_s']:8.1f} {' '.join(f'{r:.0f}' for r in rates):>30s} "
                f"{row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['service_cores']:5.2f} cores  {settings[name] or '(defaults)'}"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": args.model, "settings": settings, "results": summary}, indent=2))


if __name__ == "__main__":
    main()
