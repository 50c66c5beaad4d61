"""Where the event loop's time goes per request: py-spy on the service under wrk, samples sorted into parts.

Starts `python -m service --frontends 1` on a model repository (the bundled digits by default), loads
it with wrk at one concurrency (one small image per multipart request, benchmarks/multipart.lua),
and records the service with py-spy (`py-spy record --format raw`, one stack per sample, threads
apart). Only the event loop's thread counts: each of its busy samples goes to the part of a
request's path that its innermost recognised frame belongs to (multipart parse, HTTP, routing,
middleware, batcher, thread hops and futures, answer building, metrics, ...). Prints each part's
share of the loop's busy samples, the loop's busy share of the wall clock, and requests per second.

    pip install py-spy     # into the development environment, not the service's
    python benchmarks/loop_profile.py                      # digits, c=32, 10 s at 100 Hz
    python benchmarks/loop_profile.py --json runs/loop_profile.json --keep runs/loop_profile.txt
    python benchmarks/loop_profile.py --checkout /tmp/old     # another checkout's service (git archive ... | tar -x)
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from serve_bench import ROOT, free_port, make_jpegs, run_wrk, start, stop

# (part, substrings of a frame "function (file:line)"): the first part whose substring is in the
# innermost matching frame of a sample takes it. Order matters only where one frame matches two.
PARTS = [
    ("multipart parse", ("python_multipart", "multipart/multipart.py", "starlette/formparsers.py", "_get_form")),
    ("answer building", ("_predict_answer", "top_k (service/dataplane.py", "pydantic", "json/encoder.py", "model_dump_json")),
    ("batcher", ("service/batcher.py",)),
    ("data plane", ("service/dataplane.py",)),
    (
        "thread hops and futures",
        ("concurrent/futures", "asyncio/futures.py", "run_in_executor", "threading.py", "asyncio/tasks.py"),
    ),
    ("middleware", ("service/middleware.py", "starlette/middleware")),
    ("metrics", ("prometheus_client", "service/metrics.py")),
    (
        "route and parameters (FastAPI, Starlette)",
        ("fastapi/", "starlette/routing.py", "starlette/requests.py", "service/routes.py"),
    ),
    ("response", ("starlette/responses.py",)),
    ("HTTP protocol (uvicorn)", ("uvicorn/",)),
    ("event loop", ("asyncio/", "uvloop")),
]


def part_of(stack: list[str]) -> str:
    """The part a sample's stack (outermost frame first) is counted in."""
    for frame in reversed(stack):
        for part, needles in PARTS:
            if any(needle in frame for needle in needles):
                return part
    return "other"


def loop_samples(raw: str) -> collections.Counter[str]:
    """Samples of the event loop's thread (the main thread, which runs uvicorn) per part, from py-spy's raw output."""
    parts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack_text, _, count = line.rpartition(" ")
        frames = stack_text.split(";")
        if not frames or "MainThread" not in frames[0] and "<module> (service/__main__.py" not in stack_text:
            continue
        parts[part_of(frames[1:])] += int(count)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose service is profiled")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10, help="seconds recorded (wrk runs 3 s longer)")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"))
    parser.add_argument("--keep", type=Path, help="also write py-spy's raw stacks here")
    parser.add_argument("--json", type=Path, help="write the shares here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loop-profile-"))
    manifest = work / "manifest.txt"
    images = make_jpegs("digits" if args.model == "digits" else "cifar10", work / "images", 64)
    manifest.write_text("\n".join(str(p) for p in images) + "\n")
    port = free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--repository", str(args.repository), "--frontends", "1"]
    command += ["--grpc-port", "0", "--watch-interval-s", "0", "--log-level", "warning"]
    service = start(command, port, cwd=args.checkout.resolve())
    url = f"http://127.0.0.1:{port}/predict/{args.model}"
    figures: dict = {}
    try:
        run_wrk(url, manifest, args.concurrency, 2, 1)  # warm-up
        load = threading.Thread(
            target=lambda: figures.update(run_wrk(url, manifest, args.concurrency, args.seconds + 3, 1)[0]), daemon=True
        )
        load.start()
        raw_file = work / "stacks.txt"
        subprocess.run(
            [args.py_spy, "record", "--pid", str(service.pid), "--rate", str(args.rate), "--duration", str(args.seconds)]
            + ["--format", "raw", "--threads", "--nonblocking", "--output", str(raw_file)],
            check=True,
            capture_output=True,
        )
        load.join()
    finally:
        stop(service)
    raw = raw_file.read_text()
    if args.keep:
        args.keep.write_text(raw)
    parts = loop_samples(raw)
    busy = sum(parts.values())
    print(f"{args.model}, c={args.concurrency}: {figures.get('requests_per_s', 0):.0f} requests/s under the profiler")
    print(
        f"event loop busy: {busy} samples of {args.seconds * args.rate} ({busy / (args.seconds * args.rate):.0%} of the wall clock)"
    )
    for part, count in parts.most_common():
        print(f"  {part:45s} {count / busy:6.1%}")
    if args.json:
        shares = {part: count / busy for part, count in parts.most_common()}
        args.json.write_text(
            json.dumps({"requests_per_s": figures.get("requests_per_s"), "loop_busy_samples": busy, "shares": shares})
        )


if __name__ == "__main__":
    main()
