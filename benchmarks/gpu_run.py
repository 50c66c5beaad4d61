"""One run of under 10 minutes on a GPU machine: the service on CUDA beside the GPU's and the cores' ceilings.

Made for a lent machine with one GPU, 16 cores, Python 3.12, the CUDA 13 libraries and no internet.
Two steps:

  here, once:  python benchmarks/gpu_run.py --prepare runs/gpu-models
               trains a MobileNetV2 and an EfficientNetB0 briefly on the generated data set and exports
               them (float32 and float16) with the project's own command lines (`python -m training
               train`, `python -m export --variants float16`) into runs/gpu-models/models, an ignored
               folder that travels with the run, and prints the files' sizes;
  there:       python benchmarks/gpu_run.py --models runs/gpu-models/models --device cuda --json OUT.json

The run, in that order, each part timed against --budget-s so the whole stays under 10 minutes:
- the machine: CPUs, onnxruntime's version and providers, the GPU (nvidia-smi);
- the decode ceiling: the core decoder (kos_core.imaging) on the upload JPEGs in a process pool of
  every core, and in one process, in images per second: what front ends can feed at most;
- the in-process ceiling per model and precision: `session.run` on the device with decoded images
  at batch sizes 1 to 256 (a small search), no HTTP and no decoding: the best batch and its rate;
- the service: `python -m service --device DEVICE --precision P --frontends F` serving both models,
  `/health` checked for the CUDA provider on every version, then images/s, p50 and p99 at each
  concurrency (default 1, 32, 256) with one 320x240 JPEG per multipart request, from wrk where it
  is installed, else from a bounded asyncio client (a fixed number of keep-alive connections, each
  with one request in flight) spread over several processes; the service's CPU beside each point.

Writes a JSON and prints a table. A CPU dry run of the whole thing, small and short:

  python benchmarks/gpu_run.py --prepare runs/gpu-dry --side 64
  python benchmarks/gpu_run.py --models runs/gpu-dry/models --device cpu --duration 1 --concurrency 1,8 \\
      --frontends 1 --batch-sizes 1,8 --ceiling-seconds 0.5 --decode-seconds 1 --json runs/gpu_run-cpu-dry.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (
    LUA,
    ROOT,
    build_zoo_model,
    cpu_seconds,
    free_port,
    make_jpegs,
    progress,
    run_wrk,
    start,
    stop,
    tree,
)

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME, InputSpec, ModelMetadata
from kos_core.cpus import available_cpus
from kos_core.imaging import decode_image
from kos_core.layout import list_models, served_file

# The models of the run: name in the repository -> (the training CLI's architecture, side in pixels).
GPU_ZOO = {"mobilenet": ("mobilenet_v2", 224), "efficientnet": ("efficientnet_b0", 224)}
PRECISIONS = ("float32", "float16")
MAX_PIXELS = 40_000_000
BOUNDARY = "----kosgpurunboundary"
CUDA = "CUDAExecutionProvider"
LoadRunner = Callable[[int, float], tuple[dict, float]]


# --- here: the models -----------------------------------------------------------------------------


def prepare(folder: Path, side: int | None) -> None:
    """Train and export both models (float32 and float16) into `folder`/models and print their sizes."""
    for name in GPU_ZOO:
        build_zoo_model(name, folder, side=side, variants=("float16",), zoo=GPU_ZOO)
    repository = folder / "models"
    total = 0
    print(f"\n{'file':60s} {'MiB':>8s}")
    for path in sorted(repository.rglob("*.onnx")):
        size = path.stat().st_size
        total += size
        print(f"{str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path):60s} {size / 2**20:8.1f}")
    print(f"{'together (what the run carries: ' + str(repository) + ')':60s} {total / 2**20:8.1f}")


# --- the machine ----------------------------------------------------------------------------------


def machine() -> dict:
    import onnxruntime as ort

    found: dict = {
        "cpus": available_cpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        found["gpu"] = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
    return found


def metadata_of(path: Path) -> ModelMetadata:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return ModelMetadata.from_metadata_props(session.get_modelmeta().custom_metadata_map)


# --- the decode ceiling ---------------------------------------------------------------------------

_BLOBS: list[bytes] = []


def _keep_blobs(blobs: list[bytes]) -> None:
    _BLOBS[:] = blobs


def _decode_for(spec: InputSpec, seconds: float, offset: int) -> int:
    """Decode the pool's JPEG files, one after another, for `seconds`; how many."""
    done, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        decode_image(_BLOBS[(offset + done) % len(_BLOBS)], "x.jpg", spec, MAX_PIXELS)
        done += 1
    return done


def decode_ceiling(blobs: list[bytes], spec: InputSpec, seconds: float, processes: int) -> float:
    """Images per second that `processes` processes decode and resize to `spec` with the core decoder."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_keep_blobs, initargs=(blobs,)) as pool:
        list(pool.map(_decode_for, [spec] * processes, [0.05] * processes, range(processes)))  # workers up, caches warm
        began = time.perf_counter()
        done = sum(pool.map(_decode_for, [spec] * processes, [seconds] * processes, range(0, 997 * processes, 997)))
        return done / (time.perf_counter() - began)


# --- the in-process ceiling -----------------------------------------------------------------------


def session_ceiling(path: Path, device: str, images: np.ndarray, batch_sizes: list[int], seconds: float) -> dict:
    """`session.run` alone, on the service's own session, at each batch size: images/s and a batch's p50 and p99."""
    from service.runtime import create_session, resolve_device
    from service.settings import Settings

    session = create_session(path, Settings(device=device), resolve_device(device))  # type: ignore[arg-type]
    tried = []
    for batch in batch_sizes:
        feed = {INPUT_NAME: np.resize(images, (batch, *images.shape[1:]))}
        for _ in range(3):
            session.run([OUTPUT_NAME], feed)  # warm-up: CUDA picks its kernels per shape
        latencies: list[float] = []
        began = time.perf_counter()
        while time.perf_counter() - began < seconds or len(latencies) < 3:
            started = time.perf_counter()
            session.run([OUTPUT_NAME], feed)
            latencies.append(time.perf_counter() - started)
        rate = batch * len(latencies) / (time.perf_counter() - began)
        ms = np.array(latencies) * 1000
        tried.append(
            {
                "batch_size": batch,
                "images_per_s": rate,
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
        )
        progress(
            f"  {path.parent.parent.name} {path.name} batch {batch:4d}: {rate:9.1f} img/s, p50 {tried[-1]['p50_ms']:7.2f} ms"
        )
    best = max(tried, key=lambda t: t["images_per_s"])
    return {"providers": session.get_providers(), "best": best, "tried": tried}


# --- load -----------------------------------------------------------------------------------------


def multipart_requests(host: str, port: int, path: str, files: list[Path]) -> list[bytes]:
    """One keep-alive HTTP/1.1 POST per file, built once: the bytes wrk's multipart.lua sends."""
    built = []
    for file in files:
        body = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{file.name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + file.read_bytes()
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        built.append(head.encode() + body)
    return built


async def _connection(host: str, port: int, requests: list[bytes], first: int, end: float, out: dict) -> None:
    """One connection with one request in flight at a time, until `end`."""
    reader, writer = await asyncio.open_connection(host, port)
    k = first
    try:
        while time.perf_counter() < end:
            started = time.perf_counter()
            writer.write(requests[k % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
            )
            await reader.readexactly(length)
            if head[9:12] == b"200":
                out["latencies"].append(time.perf_counter() - started)
            else:
                out["errors"] += 1
            k += 1
    finally:
        writer.close()


def _client_process(host: str, port: int, requests: list[bytes], connections: int, first: int, seconds: float) -> dict:
    """A client process: `connections` connections for `seconds`; their latencies, errors and this process's CPU seconds."""
    out: dict = {"latencies": [], "errors": 0}

    async def run() -> None:
        end = time.perf_counter() + seconds
        await asyncio.gather(*(_connection(host, port, requests, first + 7 * i, end, out) for i in range(connections)))

    asyncio.run(run())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {**out, "cpu_s": usage.ru_utime + usage.ru_stime}


def python_load(requests: list[bytes], port: int, concurrency: int, seconds: float, processes: int) -> tuple[dict, float]:
    """Load from `concurrency` connections spread over up to `processes` client processes: figures, and the clients' cores."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    context = multiprocessing.get_context("fork")
    began = time.perf_counter()
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = list(
            pool.map(
                _client_process,
                ["127.0.0.1"] * processes,
                [port] * processes,
                [requests] * processes,
                shares,
                [101 * i for i in range(processes)],
                [seconds] * processes,
            )
        )
    wall = time.perf_counter() - began
    latencies = np.array([x for part in parts for x in part["latencies"]]) * 1000
    figures = {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else 0.0,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else 0.0,
        "errors": sum(part["errors"] for part in parts),
    }
    return figures, sum(part["cpu_s"] for part in parts) / wall


def load_runner(args: argparse.Namespace, port: int, name: str, files: list[Path], manifest: Path) -> tuple[str, LoadRunner]:
    """Which client loads the service (wrk where installed, else the Python one), and a runner: (concurrency, seconds) ->
    (figures, the client's cores)."""
    if shutil.which("wrk") and not args.python_client:
        url = f"http://127.0.0.1:{port}/predict/{name}"

        def wrk(c: int, seconds: float) -> tuple[dict, float]:
            figures, share = run_wrk(url, manifest, c, seconds, min(c, args.client_processes), LUA)
            return figures, share * (os.cpu_count() or 1)  # run_wrk gives its share of the whole machine

        return "wrk", wrk
    requests = multipart_requests("127.0.0.1", port, f"/predict/{name}", files)
    return "python", lambda c, seconds: python_load(requests, port, c, seconds, args.client_processes)


def measure_service(
    args: argparse.Namespace, repository: Path, precision: str, frontends: int, files: list[Path], work: Path, deadline: float
) -> dict:
    """Start the service on both models, check /health, and load each model at each concurrency."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--device", args.device, "--precision", precision, "--frontends", str(frontends)]
    command += ["--repository", str(repository), "--port", str(port), "--grpc-port", "0", "--watch-interval-s", "0"]
    command += ["--log-level", "warning", *args.service_args.split()]
    record: dict = {"precision": precision, "frontends": frontends, "flags": command[3:], "load": []}
    progress(f"service: {' '.join(command[1:])}")
    started = time.perf_counter()
    process = start(command, port)
    record["start_s"] = time.perf_counter() - started
    manifest = work / "manifest.txt"
    manifest.write_text("\n".join(str(p) for p in files) + "\n")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            record["health"] = json.loads(answer.read())
        providers = sorted({p for model in record["health"].get("models", []) for p in model.get("providers", [])})
        record["providers"] = providers
        record["cuda_in_health"] = CUDA in providers
        progress(f"  /health: providers {providers}")
        if args.device == "cuda" and CUDA not in providers:
            record["problem"] = "/health shows no CUDAExecutionProvider"
            return record
        for name in sorted(list_models(repository)):
            for c in args.concurrency:
                if time.monotonic() + args.duration + 2 > deadline:
                    record["load"].append({"model": name, "concurrency": c, "skipped": "past --budget-s"})
                    progress(f"  {name} c={c}: skipped, past the budget")
                    continue
                client, runner = load_runner(args, port, name, files, manifest)
                runner(c, args.warmup)  # not counted: connections, CUDA's per-shape kernels, the batcher's pace
                pids = tree(process.pid)
                before, began = cpu_seconds(pids), time.perf_counter()
                figures, client_cores = runner(c, args.duration)
                cores = (cpu_seconds(pids) - before) / (time.perf_counter() - began)
                result = {"model": name, "concurrency": c, "client": client, **figures}
                result |= {"images_per_s": figures["requests_per_s"], "service_cores": cores, "client_cores": client_cores}
                record["load"].append(result)
                progress(
                    f"  {name:12s} c={c:3d}: {result['images_per_s']:8.1f} img/s  p50 {result['p50_ms']:7.2f} ms  "
                    f"p99 {result['p99_ms']:7.2f} ms  errors {result['errors']}  service {cores:5.2f} cores  "
                    f"client {client_cores:5.2f} cores ({client})"
                )
    finally:
        stop(process)
    return record


# --- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    deadline = began + args.budget_s
    found = machine()
    progress(f"machine: {found}")
    if args.device == "cuda" and CUDA not in found["onnxruntime_providers"]:
        sys.exit(
            f"onnxruntime {found['onnxruntime']} here has no {CUDA} ({found['onnxruntime_providers']}): install onnxruntime-gpu"
        )
    repository = args.models
    names = sorted(list_models(repository))
    if not names:
        sys.exit(f"no models in {repository}: make them with --prepare")
    work = Path(tempfile.mkdtemp(prefix="gpu-run-"))
    files = make_jpegs("mobilenet", work / "jpegs", args.images)  # 320x240 photo-like JPEG files
    blobs = [f.read_bytes() for f in files]
    record: dict = {"machine": found, "device": args.device, "models": {}, "decode": {}, "ceiling": [], "service": []}
    record["jpeg_bytes_mean"] = int(np.mean([len(b) for b in blobs]))

    spec = metadata_of(served_file(repository, names[0], 1)).input_spec
    cores = available_cpus()
    progress(f"decode ceiling: {spec.height}x{spec.width} from {record['jpeg_bytes_mean']} B JPEG files, 1 and {cores} processes")
    for processes in sorted({1, cores}):
        rate = decode_ceiling(blobs, spec, args.decode_seconds, processes)
        record["decode"][str(processes)] = rate
        progress(f"  {processes:3d} processes: {rate:9.1f} img/s")

    for name in names:
        for precision in PRECISIONS:
            path = served_file(repository, name, 1, precision)
            meta = metadata_of(path)
            record["models"].setdefault(name, {"architecture": meta.architecture, "files": {}})["files"][precision] = {
                "path": str(path),
                "mib": path.stat().st_size / 2**20,
            }
            images = np.stack([decode_image(b, "x.jpg", meta.input_spec, MAX_PIXELS) for b in blobs[:16]])
            progress(f"in-process ceiling: {name} {precision} ({path.name})")
            found_ceiling = session_ceiling(path, args.device, images, args.batch_sizes, args.ceiling_seconds)
            record["ceiling"].append({"model": name, "precision": precision, **found_ceiling})

    for precision in PRECISIONS:
        for frontends in args.frontends:
            record["service"].append(measure_service(args, repository, precision, frontends, files, work, deadline))
    shutil.rmtree(work, ignore_errors=True)
    record["wall_s"] = time.monotonic() - began
    return record


def print_table(record: dict) -> None:
    print(f"\n{record['machine']}")
    print(
        "\ndecode ceiling (core decoder, process pool): "
        + ", ".join(f"{n} processes {r:.0f} img/s" for n, r in record["decode"].items())
    )
    print(f"\n{'model':12s} {'precision':9s} {'best batch':>10s} {'session.run img/s':>18s} {'batch p50 ms':>12s}  providers")
    for c in record["ceiling"]:
        best = c["best"]
        print(
            f"{c['model']:12s} {c['precision']:9s} {best['batch_size']:10d} {best['images_per_s']:18.1f} {best['p50_ms']:12.2f}  "
            f"{','.join(c['providers'])}"
        )
    ceilings = {(c["model"], c["precision"]): c["best"]["images_per_s"] for c in record["ceiling"]}
    decode = max(record["decode"].values())
    print(
        f"\n{'model':12s} {'precision':9s} {'frontends':>9s} {'conc':>5s} {'img/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s} "
        f"{'service cores':>13s} {'client cores':>12s} {'of session.run':>14s} {'of decode':>9s}"
    )
    for service in record["service"]:
        if "problem" in service:
            print(f"{service['precision']:9s} --frontends {service['frontends']}: {service['problem']}")
        for r in service["load"]:
            if "skipped" in r:
                print(
                    f"{r['model']:12s} {service['precision']:9s} {service['frontends']:9d} {r['concurrency']:5d}  skipped ({r['skipped']})"
                )
                continue
            ceiling = ceilings.get((r["model"], service["precision"]))
            print(
                f"{r['model']:12s} {service['precision']:9s} {service['frontends']:9d} {r['concurrency']:5d} {r['images_per_s']:9.1f} "
                f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['errors']:6d} {r['service_cores']:13.2f} {r['client_cores']:12.2f} "
                f"{r['images_per_s'] / ceiling if ceiling else 0:14.0%} {r['images_per_s'] / decode:9.0%}"
            )
    print(f"\nwall time {record['wall_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--prepare", type=Path, metavar="DIR", help="make the models into DIR/models (here, before the run) and stop"
    )
    parser.add_argument("--side", type=int, help="with --prepare: image side in pixels (default: each architecture's own, 224)")
    parser.add_argument(
        "--models", type=Path, default=ROOT / "runs" / "gpu-models" / "models", help="the model repository to serve"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--concurrency", default="1,32,256", help="comma-separated connection counts")
    parser.add_argument("--frontends", default="1,8", help="comma-separated --frontends values to serve with")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each point, not counted")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128,256", help="the in-process ceiling's search")
    parser.add_argument("--ceiling-seconds", type=float, default=1.5, help="seconds per batch size in the ceiling's search")
    parser.add_argument("--decode-seconds", type=float, default=4.0, help="seconds of the decode ceiling, per pool size")
    parser.add_argument("--images", type=int, default=64, help="distinct JPEG files cycled through")
    parser.add_argument("--client-processes", type=int, default=4, help="processes of the Python client (or wrk threads)")
    parser.add_argument("--python-client", action="store_true", help="the Python client even where wrk is installed")
    parser.add_argument("--service-args", default="", help="extra flags for python -m service")
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="load points that would end past this many seconds are skipped"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "gpu_run.json", help="where to write the figures")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare.resolve(), args.side)
        return
    args.models = args.models.resolve()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.frontends = [int(n) for n in args.frontends.split(",")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    record = run(args)
    print_table(record)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
