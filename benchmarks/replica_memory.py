"""Peak memory of one service process under load: what a replica's memory request must cover.

Starts `python -m service` on a loopback port with the flags a CPU replica runs with
(deploy/kubernetes/overlays/cpu), serving the bundled digits model and the MobileNetV2-sized model
that benchmarks/serve_bench.py exports (the same cache), sends a bounded number of one-image
uploads at the given concurrency to each model, then replaces the MobileNetV2 file with a fresh
copy so that the service loads and warms the replacement beside the version it serves (as a
rollout of a new model version does), and prints the process's resident memory: after start-up,
after the load, and its peak (VmHWM) over the whole run, as JSON.

    python benchmarks/replica_memory.py                     # 2,000 requests per model at concurrency 32
    python benchmarks/replica_memory.py --requests 500 --concurrency 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("serve_bench", Path(__file__).with_name("serve_bench.py"))
serve_bench = importlib.util.module_from_spec(_spec)
sys.modules["serve_bench"] = serve_bench
_spec.loader.exec_module(serve_bench)

# The CPU overlay's settings (deploy/kubernetes/overlays/cpu/settings.env) on two cores.
REPLICA_FLAGS = [
    "--max-batch-size", "32",
    "--intra-op-threads", "1",
    "--inference-workers", "2",
    "--lone-request-threads", "2",
    "--decode-workers", "2",
    "--watch-interval-s", "1",
    "--log-level", "warning",
]  # fmt: skip


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def load(port: int, model: str, files: list[Path], requests: int, concurrency: int) -> int:
    """Send `requests` one-image uploads, `concurrency` at a time; return how many were not 200."""
    blobs = [(path.name, path.read_bytes()) for path in files]
    failures = 0
    lock = threading.Lock()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

        def one(i: int) -> None:
            nonlocal failures
            name, data = blobs[i % len(blobs)]
            answer = client.post(f"/predict/{model}", files={"files": (name, data, "image/jpeg")})
            if answer.status_code != 200:
                with lock:
                    failures += 1

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
    return failures


def wait_for_version(port: int, model: str, version: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = httpx.get(f"http://127.0.0.1:{port}/models/{model}", timeout=5).json()
        if any(v.get("version") == version and v.get("state") == "ready" for v in answer.get("models", [])):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{model} version {version} did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="uploads per model")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-cache", help="where the MobileNetV2 export is kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="replica-memory-") as tmp:
        work = Path(tmp)
        repository = work / "repository"
        for name in ("digits", "mobilenet"):
            (repository / name / "1").mkdir(parents=True)
            shutil.copy(serve_bench.model_file(name, args.cache), repository / name / "1" / "model.onnx")
        images = {name: serve_bench.make_jpegs(name, work / "images" / name, 32) for name in ("digits", "mobilenet")}
        port = serve_bench.free_port()
        command = [sys.executable, "-m", "service", "--port", str(port), "--repository", str(repository), *REPLICA_FLAGS]
        process = serve_bench.start(command, port)
        try:
            ready_kib = status_kib(process.pid, "VmRSS")
            failures = {name: load(port, name, images[name], args.requests, args.concurrency) for name in images}
            loaded_kib = status_kib(process.pid, "VmRSS")
            # A new version beside the served one: both are held until the new one is warm.
            staged = repository / "mobilenet" / ".2.tmp"
            staged.mkdir()
            shutil.copy(repository / "mobilenet" / "1" / "model.onnx", staged / "model.onnx")
            staged.rename(repository / "mobilenet" / "2")
            wait_for_version(port, "mobilenet", 2)
            failures["mobilenet v2"] = load(port, "mobilenet", images["mobilenet"], args.requests // 4, args.concurrency)
            peak_kib = status_kib(process.pid, "VmHWM")
        finally:
            serve_bench.stop(process)
    result = {
        "flags": REPLICA_FLAGS,
        "requests_per_model": args.requests,
        "concurrency": args.concurrency,
        "failed_requests": failures,
        "rss_ready_mib": round(ready_kib / 1024),
        "rss_after_load_mib": round(loaded_kib / 1024),
        "rss_peak_mib": round(peak_kib / 1024),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
