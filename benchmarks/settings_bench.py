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
import sys
import tempfile
from pathlib import Path

from serve_bench import MODELS, ROOT, free_port, make_jpegs, model_file, run_wrk, start, stop, wrk_with_server_cpu


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
            port = free_port()
            command = [sys.executable, "-m", "service", "--port", str(port), "--repository", str(repository)]
            command += ["--grpc-port", "0", "--watch-interval-s", "0", "--log-level", "warning", *flags.split()]
            servers[name] = (start(command, port), f"http://127.0.0.1:{port}/predict/{args.model}")
        for _, url in servers.values():
            run_wrk(url, manifest, max(concurrencies), 2, 1)  # warm-up, not counted
        results: dict[str, dict[int, list[dict]]] = {n: {c: [] for c in concurrencies} for n in settings}
        for round_ in range(args.rounds):
            order = list(settings) if round_ % 2 == 0 else list(settings)[::-1]
            for c in concurrencies:
                for name in order:
                    process, url = servers[name]
                    figures, _, cores = wrk_with_server_cpu(process.pid, url, manifest, c, args.duration)
                    results[name][c].append({**figures, "service_cores": cores})
                    print(
                        f"round {round_ + 1} {name:>12s} c={c:3d}: {figures['requests_per_s']:8.1f} img/s  "
                        f"p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms  service CPU {cores:4.2f} cores",
                        flush=True,
                    )
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
