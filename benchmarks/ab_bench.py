"""Two checkouts of the service side by side: requests per second in alternating wrk rounds, in one run.

Each checkout (a folder holding service/, e.g. `git archive main | tar -x -C /tmp/old`) is served by
its own `python -m service`, started in that folder so that it imports its own code, on the same
model repository with the same flags; wrk uploads the same small JPEG files (one per request,
benchmarks/multipart.lua) at one concurrency, in alternating rounds (A B B A ...), so that drift in
the machine's load hits both alike. Prints each round, the medians, and B's median over A's.

    python benchmarks/ab_bench.py /tmp/old .                  # digits, c=32, 6 rounds of 5 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from serve_bench import ROOT, free_port, make_jpegs, run_wrk, start, stop, wrk_with_server_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="the first checkout (the old tree)")
    parser.add_argument("b", type=Path, help="the second checkout (the new tree)")
    parser.add_argument("--model", default="digits", help="a model of --repository")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round and checkout")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--service-args", default="--frontends 1", help="flags for both services")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ab-bench-"))
    manifest = work / "manifest.txt"
    manifest.write_text("\n".join(str(p) for p in make_jpegs("digits", work / "jpegs", 64)) + "\n")
    servers = {}
    try:
        for label, tree in (("A", args.a), ("B", args.b)):
            port = free_port()
            command = [sys.executable, "-m", "service", "--port", str(port), "--repository", str(args.repository.resolve())]
            command += ["--grpc-port", "0", "--watch-interval-s", "0", "--log-level", "warning", *args.service_args.split()]
            servers[label] = (start(command, port, cwd=tree.resolve()), f"http://127.0.0.1:{port}/predict/{args.model}")
        for _, url in servers.values():
            run_wrk(url, manifest, args.concurrency, 2, 1)  # warm-up, not counted
        rates: dict[str, list[float]] = {"A": [], "B": []}
        for round_ in range(args.rounds):
            for label in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                process, url = servers[label]
                figures, _, cores = wrk_with_server_cpu(process.pid, url, manifest, args.concurrency, args.duration)
                rates[label].append(figures["requests_per_s"])
                print(
                    f"round {round_ + 1} {label}: {figures['requests_per_s']:7.1f} req/s  p50 {figures['p50_ms']:6.2f} ms  "
                    f"errors {figures['errors']}  service CPU {cores:4.2f} cores",
                    flush=True,
                )
    finally:
        for process, _ in servers.values():
            stop(process)
    a, b = statistics.median(rates["A"]), statistics.median(rates["B"])
    print(f"\n{args.model}, c={args.concurrency}, {args.rounds} rounds of {args.duration:g} s")
    print(f"A {args.a}: median {a:.1f} req/s ({' '.join(f'{r:.0f}' for r in rates['A'])})")
    print(f"B {args.b}: median {b:.1f} req/s ({' '.join(f'{r:.0f}' for r in rates['B'])})")
    print(f"B / A: {b / a:.3f}")


if __name__ == "__main__":
    main()
