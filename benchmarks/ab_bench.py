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
import tempfile
from pathlib import Path

from serve_bench import ROOT, alternating_rounds, make_jpegs, start_service, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="the first checkout (the old tree)")
    parser.add_argument("b", type=Path, help="the second checkout (the new tree)")
    parser.add_argument(
        "--model",
        default="digits",
        help="a model of --repository; uploads: digits for digits, 32x32 photos for cifar10, else 320x240",
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round and checkout")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--service-args", default="--frontends 1", help="flags for both services")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ab-bench-"))
    manifest = work / "manifest.txt"
    manifest.write_text("\n".join(str(p) for p in make_jpegs(args.model, work / "jpegs", 64)) + "\n")
    servers = {}
    try:
        for label, tree in (("A", args.a), ("B", args.b)):
            process, port = start_service(args.repository.resolve(), args.service_args.split(), cwd=tree.resolve())
            servers[label] = (process, f"http://127.0.0.1:{port}/predict/{args.model}")
        results = alternating_rounds(servers, manifest, [args.concurrency], args.rounds, args.duration)
    finally:
        for process, _ in servers.values():
            stop(process)
    rates = {label: [r["requests_per_s"] for r in results[label][args.concurrency]] for label in servers}
    a, b = statistics.median(rates["A"]), statistics.median(rates["B"])
    print(f"\n{args.model}, c={args.concurrency}, {args.rounds} rounds of {args.duration:g} s")
    print(f"A {args.a}: median {a:.1f} req/s ({' '.join(f'{r:.0f}' for r in rates['A'])})")
    print(f"B {args.b}: median {b:.1f} req/s ({' '.join(f'{r:.0f}' for r in rates['B'])})")
    print(f"B / A: {b / a:.3f}")


if __name__ == "__main__":
    main()
