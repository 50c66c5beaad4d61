"""End-to-end serving benchmark: the service beside the in-process ceiling and a naive endpoint.

For each model (the bundled digits model, the zoo's CIFAR-10 CNN at 32x32 and a MobileNetV2 at
224x224, the last two trained briefly on the generated data set and exported, once, by `python -m
training train` and `python -m export` into a cache folder) it measures, in one run:

- the in-process ceiling: decode and resize on all cores plus `session.run`, pipelined, at the
  best batch size, intra-op thread count and batches in flight found, on the same JPEG files, no HTTP;
- `python -m service` (dynamic batching) under wrk at each concurrency;
- a naive FastAPI endpoint (one request, one run; benchmarks/naive_server.py) under the same load,
  decoding with the service's own decoder, and with --naive-pillow the same endpoint decoding
  every image with Pillow (`naive-pil`), as a hand-written endpoint does;
- the same service over the Open Inference Protocol (v2), in the same run: REST with the binary
  tensor data extension carrying the encoded JPEG as BYTES (`v2-jpeg`) or the client-decoded UINT8
  tensor (`v2-uint8`), and gRPC with the UINT8 tensor (`grpc-u8`).

Every multipart request uploads one real JPEG as multipart/form-data (wrk + benchmarks/multipart.lua);
the v2 REST bodies are built once and sent by wrk (benchmarks/v2.lua); gRPC requests are serialised
once and sent by a small grpc.aio client in a child process (wrk speaks no HTTP/2), one connection
per concurrent caller. Every request asks for the top 5 classes (multipart's default top_k, the
classification extension on v2). The load generators run on the same cores, so their CPU share is
reported beside each figure. Prints a table and writes JSON.

    python benchmarks/serve_bench.py                       # both models, concurrency 1 8 32 64
    python benchmarks/serve_bench.py --duration 3 --models digits --concurrency 1,32   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the service package of this checkout, beside benchmarks/

from service.measure import Pipeline, best_pipeline, service_setting  # noqa: E402

LUA = Path(__file__).resolve().parent / "multipart.lua"
V2_LUA = Path(__file__).resolve().parent / "v2.lua"
# The service over each protocol, beside multipart ("service"): what the v2 comparison lines read.
V2_TARGETS = ("v2-jpeg", "v2-uint8", "grpc-u8")
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
TOP_K = 5  # classes asked for per image, as /predict's default
# The naive endpoint decoding every image with Pillow (--naive-pillow): as a hand-written endpoint does.
NAIVE_PILLOW = "naive-pil"


@dataclass
class LoadResult:
    target: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    wrk_cpu_share: float  # the load generator's (wrk, or the gRPC client), of the whole machine (all cores)
    server_cpu: float = 0.0  # the server's process tree, in cores (1.0: one core busy all the time)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- models -------------------------------------------------------------------------------------


# The models the benchmark serves besides the bundled digits, made as a user makes a model:
# `python -m training train` on the generated data set, then `python -m export`. Speed is what is
# measured, so a short run is enough (MobileNetV2 from random weights); the export still checks
# parity like any other, and since a network trained this briefly may answer nearly alike for every
# image, its card says whether that check was conclusive (--allow-inconclusive-parity lets the export
# through either way).
ZOO = {"cifar10": ("cifar10_cnn", 32), "mobilenet": ("mobilenet_v2", 224)}
MODELS = ("digits", *ZOO)


def zoo_training(name: str, side: int | None = None, zoo: dict[str, tuple[str, int]] = ZOO) -> list[str]:
    """The training command line's options for one of `zoo`'s models, at `side` x `side` pixels."""
    architecture, natural = zoo[name]
    side = side or natural
    return [
        "--model", architecture, "--dataset", "generated", "--image-size", f"{side}x{side}", "--color-mode", "rgb",
        "--generated-classes", "10", "--generated-per-class", "20", "--weights", "none",
        "--epochs", "2", "--batch-size", "8", "--seed", "0",
    ]  # fmt: skip


def build_zoo_model(
    name: str, cache: Path, side: int | None = None, variants: tuple[str, ...] = (), zoo: dict[str, tuple[str, int]] = ZOO
) -> Path:
    """Train and export one of `zoo`'s models with the project's own command lines; returns the float32 model file.

    `variants` (float16, int8) are exported beside it, kept whatever accuracy they lose: a model
    trained this briefly answers nearly alike for every image, so its accuracy proves nothing.
    """
    from kos_core.layout import model_path

    run_dir, repository = cache / f"{name}-run", cache / "models"
    commands = [
        ["-m", "training", "train", *zoo_training(name, side, zoo), "--run-dir", str(run_dir), "--ledger", str(cache / "ledger.csv"),
         "--overwrite", "--note", f"serve_bench's {zoo[name][0]}"],
        ["-m", "export", str(run_dir), "--name", name, "--version", "1", "--overwrite", "--repository",
         str(repository), "--allow-inconclusive-parity", *(["--variants", *variants, "--force-variants"] if variants else [])],
    ]  # fmt: skip
    for command in commands:
        progress(f"python {' '.join(command)}")
        subprocess.run([sys.executable, *command], check=True, cwd=ROOT)
    return model_path(repository, name, 1)


def model_file(name: str, cache: Path) -> Path:
    from kos_core.layout import model_path

    if name == "digits":
        return model_path(ROOT / "models", "digits", 1)
    path = model_path(cache / "models", name, 1)
    if not path.is_file():
        progress(f"making {ZOO[name][0]} in {cache} (once): a short training run and an export, by the command lines")
        path = build_zoo_model(name, cache)
    return path


# --- images -------------------------------------------------------------------------------------


def make_jpegs(name: str, folder: Path, count: int) -> list[Path]:
    """Real JPEG files: held-out scikit-learn digits for digits, photo-like pictures for the others
    (32x32 as CIFAR-10's own for cifar10, 320x240 for MobileNetV2)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits().images
        for i in range(count):
            array = np.clip(digits[-1 - i] * 16, 0, 255).astype(np.uint8)
            paths.append(folder / f"digit{i:03d}.jpg")
            Image.fromarray(array, mode="L").save(paths[-1], quality=95)
    else:
        width, height = (32, 32) if name == "cifar10" else (320, 240)
        scale = width / 320
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(count):
            # Smooth colour fields plus texture compress like photographs do (~20-40 kB each at 320x240).
            phase = rng.uniform(0, 2 * np.pi, 3)
            channels = [
                127 + 100 * np.sin(xx / (scale * rng.uniform(20, 80)) + yy / (scale * rng.uniform(20, 80)) + p) for p in phase
            ]
            array = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
            paths.append(folder / f"photo{i:03d}.jpg")
            Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="RGB").save(paths[-1], quality=90)
    return paths


# --- servers and load ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, cwd: Path = ROOT) -> subprocess.Popen:
    """Run `command` in `cwd` (a checkout: `python -m service` imports the service found there) until /health answers 200."""
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{command} exited:\n{log.read().decode(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"{command} did not become healthy")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def run_wrk(url: str, manifest: Path, concurrency: int, seconds: float, threads: int, script: Path = LUA) -> tuple[dict, float]:
    """Run wrk; its parsed figures and its CPU share of the machine."""
    command = [
        "wrk",
        f"-t{min(threads, concurrency)}",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
        "--",
        str(manifest),
    ]
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        began = time.perf_counter()
        process = subprocess.Popen(command, stdout=out_file, stderr=err_file)
        # wait4 gives this child's own CPU time, from the kernel's accounting.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - began
        process.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read().decode(), err_file.read().decode()
    cpu = usage.ru_utime + usage.ru_stime
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed: {err}")
    figures = {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
        "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
        "errors": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)) else 0,
    }
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        figures["errors"] += sum(int(g) for g in m.groups())
    return figures, cpu / wall / (os.cpu_count() or 1)


Runner = Callable[[int, float], tuple[dict, float]]
K = TypeVar("K")  # what names a server in alternating_rounds


def tree(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += tree(int(child))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes (and their reaped children), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def wrk_with_server_cpu(pid: int, url: str, manifest: Path, concurrency: int, seconds: float) -> tuple[dict, float, float]:
    """One wrk run (one thread) against the server `pid`: wrk's figures, wrk's CPU share, and the server tree's cores."""
    return with_server_cpu(wrk_runner(url, manifest, 1), pid)(concurrency, seconds)


def start_service(repository: Path, flags: Sequence[str] = (), cwd: Path = ROOT) -> tuple[subprocess.Popen, int]:
    """`python -m service` (the one in `cwd`) on a free loopback port, without gRPC, repository scans or info
    logs, once /health answers 200: the process and its port."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--repository", str(repository)]
    command += ["--grpc-port", "0", "--watch-interval-s", "0", "--log-level", "warning", *flags]
    return start(command, port, cwd=cwd), port


def alternating_rounds(
    servers: dict[K, tuple[subprocess.Popen, str]], manifest: Path, concurrencies: Sequence[int], rounds: int, duration: float
) -> dict[K, dict[int, list[dict]]]:
    """wrk against every server (process, predict URL) at each concurrency, in rounds whose order alternates
    (A B, then B A, ...) so that drift in the machine's load hits all alike, after an uncounted warm-up.

    Each round's wrk figures, with the server tree's CPU (`service_cores`) and wrk's share of the
    machine (`wrk_cpu_share`); a line is printed per round.
    """
    for _, url in servers.values():
        run_wrk(url, manifest, max(concurrencies), 2, 1)  # warm-up, not counted
    results: dict[K, dict[int, list[dict]]] = {key: {c: [] for c in concurrencies} for key in servers}
    keys = list(servers)
    for round_ in range(rounds):
        for c in concurrencies:
            for key in keys if round_ % 2 == 0 else keys[::-1]:
                process, url = servers[key]
                figures, wrk_share, cores = wrk_with_server_cpu(process.pid, url, manifest, c, duration)
                results[key][c].append({**figures, "service_cores": cores, "wrk_cpu_share": wrk_share})
                print(
                    f"round {round_ + 1} {key!s:>12} c={c:3d}: {figures['requests_per_s']:8.1f} req/s  "
                    f"p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms  errors {figures['errors']}  "
                    f"service CPU {cores:4.2f} cores  wrk CPU {wrk_share:5.1%}",
                    flush=True,
                )
    return results


def with_server_cpu(runner: Runner, pid: int) -> Callable[[int, float], tuple[dict, float, float]]:
    """The runner, also returning the server's process tree's CPU use during the run, in cores."""

    def run(concurrency: int, seconds: float) -> tuple[dict, float, float]:
        pids = tree(pid)
        before, began = cpu_seconds(pids), time.perf_counter()
        figures, load_share = runner(concurrency, seconds)
        return figures, load_share, (cpu_seconds(pids) - before) / (time.perf_counter() - began)

    return run


def wrk_runner(url: str, manifest: Path, threads: int, script: Path = LUA) -> Runner:
    return lambda concurrency, seconds: run_wrk(url, manifest, concurrency, seconds, threads, script)


def grpc_runner(target: str, requests: Path) -> Runner:
    """Load from a child process (its CPU counted like wrk's): `requests` holds serialised ModelInferRequests."""

    def run(concurrency: int, seconds: float) -> tuple[dict, float]:
        command = [sys.executable, __file__, "--grpc-load", target, str(requests), str(concurrency), str(max(1.0, seconds))]
        with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
            began = time.perf_counter()
            process = subprocess.Popen(command, stdout=out_file, stderr=err_file, cwd=ROOT)
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - began
            out_file.seek(0)
            err_file.seek(0)
            out, err = out_file.read().decode(), err_file.read().decode()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the gRPC load generator failed: {err[-2000:]}")
        return json.loads(out), (usage.ru_utime + usage.ru_stime) / wall / (os.cpu_count() or 1)

    return run


def write_requests(path: Path, messages: list[bytes]) -> None:
    path.write_bytes(b"".join(len(m).to_bytes(4, "little") + m for m in messages))


def read_requests(path: Path) -> list[bytes]:
    data, out, offset = path.read_bytes(), [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        out.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return out


async def grpc_load(target: str, requests: list[bytes], concurrency: int, seconds: float) -> dict:
    """`concurrency` callers, each on its own connection, sending pre-serialised requests back to back."""
    import grpc

    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
    ]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(concurrency)]
    # No (de)serialisers: bytes go out as they are and answers are not parsed, as wrk sends prepared bodies.
    calls = [channel.unary_unary(GRPC_METHOD) for channel in channels]
    await asyncio.gather(*(call(requests[0], timeout=60) for call in calls))  # connect; not counted
    latencies: list[float] = []
    errors = 0

    async def caller(index: int) -> None:
        nonlocal errors
        call, k = calls[index], index
        while time.perf_counter() < end:
            started = time.perf_counter()
            try:
                await call(requests[k % len(requests)], timeout=30)
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError:
                errors += 1
            k += concurrency

    began = time.perf_counter()
    end = began + seconds
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    for channel in channels:
        await channel.close()
    ms = np.array(latencies) * 1000 if latencies else np.array([0.0])
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": errors,
    }


def v2_requests(name: str, path: Path, blobs: list[bytes], folder: Path) -> dict[str, Path]:
    """Every v2 body, built once: REST binary with the JPEG as BYTES, REST binary UINT8, gRPC UINT8.

    The UINT8 tensors are what a client that decodes and resizes itself would send: the model's
    own input, decoded by the shared core exactly as the service decodes an upload.
    """
    import onnxruntime as ort

    from kos_core.artifact import INPUT_NAME, OUTPUT_NAME, ModelMetadata
    from kos_core.imaging import decode_image
    from service.v2.codec import serialize_bytes
    from service.v2.messages import messages

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    tensors = [decode_image(blob, "x.jpg", meta.input_spec, 40_000_000)[None] for blob in blobs]
    outputs = [{"name": OUTPUT_NAME, "parameters": {"classification": TOP_K}}]
    folder.mkdir(parents=True, exist_ok=True)
    manifests = {}
    for protocol, datatype, payloads in (
        ("v2-jpeg", "BYTES", [serialize_bytes([blob]) for blob in blobs]),
        ("v2-uint8", "UINT8", [tensor.tobytes() for tensor in tensors]),
    ):
        lines = []
        for i, (payload, tensor) in enumerate(zip(payloads, tensors)):
            shape = [1] if datatype == "BYTES" else list(tensor.shape)
            tensor_header = {
                "name": INPUT_NAME,
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": len(payload)},
            }
            header = json.dumps({"inputs": [tensor_header], "outputs": outputs}).encode()
            body = folder / f"{protocol}-{i}.bin"
            body.write_bytes(header + payload)
            lines.append(f"{len(header)} {body}")
        manifests[protocol] = folder / f"{protocol}.txt"
        manifests[protocol].write_text("\n".join(lines) + "\n")
    protocol = messages()
    serialised = []
    for tensor in tensors:
        request = protocol.ModelInferRequest(model_name=name, raw_input_contents=[tensor.tobytes()])
        request.inputs.add(name=INPUT_NAME, datatype="UINT8", shape=list(tensor.shape))
        request.outputs.add(name=OUTPUT_NAME).parameters["classification"].int64_param = TOP_K
        serialised.append(request.SerializeToString())
    manifests["grpc-u8"] = folder / "grpc-u8.bin"
    write_requests(manifests["grpc-u8"], serialised)
    return manifests


def load_test(
    targets: dict[str, Runner],
    servers: dict[str, int],
    concurrencies: list[int],
    seconds: float,
    rounds: int,
    ceiling: Pipeline | None = None,
) -> tuple[list[LoadResult], dict[int, float]]:
    """Every target at every concurrency, in alternating rounds so that drift in the machine's
    load (it is shared) hits every target alike; rates are averaged, p50 is the median of the
    rounds' p50s, p99 the worst round's. The ceiling, when given, is re-measured in every round
    too, so each concurrency's "share of the ceiling" compares figures taken side by side."""
    measured = {target: with_server_cpu(runner, servers[target]) for target, runner in targets.items()}
    for runner in targets.values():
        runner(max(concurrencies), max(1.0, seconds / 3))  # warm-up, not counted
    results = []
    ceilings: dict[int, float] = {}
    for c in concurrencies:
        rounds_by_target: dict[str, list[tuple[dict, float, float]]] = {t: [] for t in targets}
        ceiling_rates = []
        for _ in range(rounds):
            if ceiling is not None:
                ceiling_rates.append(ceiling.rate(seconds / rounds))
            for target, runner in measured.items():
                rounds_by_target[target].append(runner(c, seconds / rounds))
        if ceiling_rates:
            ceilings[c] = float(np.mean(ceiling_rates))
            progress(f"  ceiling  c={c:3d}: {ceilings[c]:8.1f} img/s (in-process, same rounds)")
        for target, runs in rounds_by_target.items():
            result = LoadResult(
                target=target,
                concurrency=c,
                requests_per_s=float(np.mean([f["requests_per_s"] for f, _, _ in runs])),
                p50_ms=float(np.median([f["p50_ms"] for f, _, _ in runs])),
                p99_ms=max(f["p99_ms"] for f, _, _ in runs),
                errors=sum(f["errors"] for f, _, _ in runs),
                wrk_cpu_share=float(np.mean([share for _, share, _ in runs])),
                server_cpu=float(np.mean([cores for _, _, cores in runs])),
            )
            results.append(result)
            progress(
                f"  {target:8s} c={c:3d}: {result.requests_per_s:8.1f} img/s  p50 {result.p50_ms:7.2f} ms  "
                f"p99 {result.p99_ms:7.2f} ms  server CPU {result.server_cpu:5.0%}  load CPU {result.wrk_cpu_share:5.1%}"
            )
    return results, ceilings


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict:
    path = model_file(name, args.cache)
    jpegs = make_jpegs(name, work / name / "images", args.images)
    manifest = work / name / "manifest.txt"
    manifest.write_text("\n".join(str(p) for p in jpegs) + "\n")
    blobs = [p.read_bytes() for p in jpegs]
    record: dict = {"model": name, "model_file": str(path), "jpeg_bytes_mean": int(np.mean([len(b) for b in blobs]))}
    pipeline = None
    if not args.skip_ceiling:
        progress(f"{name}: in-process ceiling, searching the best setting")
        pipeline, tried = best_pipeline(
            path, blobs, args.ceiling_seconds, [1, 8, 32], report=lambda line: progress(f"  ceiling {line}")
        )
        record["ceiling"] = asdict(pipeline.setting)
        record["ceiling_search"] = [asdict(t) for t in tried]
    repository = work / name / "repository"
    shutil.rmtree(repository, ignore_errors=True)
    (repository / name / "1").mkdir(parents=True)
    shutil.copyfile(path, repository / name / "1" / "model.onnx")
    tuned = []
    if "ceiling" in record and args.tuned:
        tuned = service_setting(pipeline.setting, tried)
    port, grpc_port = free_port(), free_port()
    v2 = v2_requests(name, path, blobs, work / name / "v2")
    service = [
        sys.executable,
        "-m",
        "service",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--repository",
        str(repository),
        "--log-level",
        "warning",
        "--watch-interval-s",
        "0",
        *tuned,
        *args.service_args.split(),
    ]
    record["service_flags"] = service[3:]
    progress(f"{name}: starting the service ({' '.join(service[2:])})" + ("" if args.skip_naive else " and the naive endpoint"))
    processes = [start(service, port)]
    infer = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
    targets: dict[str, Runner] = {
        "service": wrk_runner(f"http://127.0.0.1:{port}/predict/{name}", manifest, args.wrk_threads),
        "v2-jpeg": wrk_runner(infer, v2["v2-jpeg"], args.wrk_threads, V2_LUA),
        "v2-uint8": wrk_runner(infer, v2["v2-uint8"], args.wrk_threads, V2_LUA),
        "grpc-u8": grpc_runner(f"127.0.0.1:{grpc_port}", v2["grpc-u8"]),
    }
    try:
        owners = dict.fromkeys(targets, processes[0])
        naive = [sys.executable, str(Path(__file__).parent / "naive_server.py"), str(path)]
        for target, flags, wanted in (("naive", [], not args.skip_naive), (NAIVE_PILLOW, ["--pillow"], args.naive_pillow)):
            if wanted:
                naive_port = free_port()
                processes.append(start([*naive, *flags, "--port", str(naive_port)], naive_port))
                targets[target] = wrk_runner(f"http://127.0.0.1:{naive_port}/predict/{name}", manifest, args.wrk_threads)
                owners[target] = processes[-1]
        servers = {target: owners[target].pid for target in targets}
        results, ceilings = load_test(targets, servers, args.concurrency, args.duration, args.rounds, pipeline)
    finally:
        for process in processes:
            stop(process)
    record["load"] = [asdict(r) for r in results]
    if ceilings:
        record["ceiling"]["images_per_s"] = float(np.mean(list(ceilings.values())))
        record["ceiling_by_concurrency"] = ceilings
    return record


def print_table(records: list[dict]) -> None:
    print()
    print(
        f"{'model':10s} {'target':9s} {'conc':>4s} {'img/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s} {'server CPU':>10s} {'load CPU':>8s} {'of ceiling':>10s}"
    )
    for record in records:
        ceiling = record.get("ceiling", {}).get("images_per_s")
        if ceiling:
            c = record["ceiling"]
            print(
                f"{record['model']:10s} {'ceiling':9s} {'':>4s} {ceiling:9.1f} {'':>8s} {'':>8s} {'':>6s} {'':>10s} {'':>8s} {'100%':>10s}"
                f"   (batch {c['batch_size']}, intra-op threads {c['intra_op_threads']}, spinning {c['spinning']}, "
                f"batches in flight {c['workers']})"
            )
        by_c = record.get("ceiling_by_concurrency", {})
        for r in record["load"]:
            alongside = by_c.get(r["concurrency"], ceiling)
            share = f"{r['requests_per_s'] / alongside:.0%}" if alongside else "-"
            print(
                f"{record['model']:10s} {r['target']:9s} {r['concurrency']:4d} {r['requests_per_s']:9.1f} {r['p50_ms']:8.2f} "
                f"{r['p99_ms']:8.2f} {r['errors']:6d} {r['server_cpu']:10.0%} {r['wrk_cpu_share']:8.1%} {share:>10s}"
            )
        by = {(r["target"], r["concurrency"]): r for r in record["load"]}
        if ceiling and ("service", 32) in by:
            alongside = by_c.get(32, ceiling)
            print(
                f"  target 1: service at c=32 is {by[('service', 32)]['requests_per_s'] / alongside:.0%} of the ceiling "
                f"measured in the same rounds, {alongside:.1f} img/s (goal >= 85%)"
            )
        for c in sorted({r["concurrency"] for r in record["load"]}):
            if ("service", c) not in by:
                continue
            base = by[("service", c)]
            ratios = [
                f"{t} {by[(t, c)]['requests_per_s'] / base['requests_per_s']:.2f}x img/s, p50 {by[(t, c)]['p50_ms'] - base['p50_ms']:+.2f} ms"
                for t in V2_TARGETS
                if (t, c) in by and base["requests_per_s"]
            ]
            if ratios:
                print(f"  v2 against multipart at c={c}: " + "; ".join(ratios))
        for naive in ("naive", NAIVE_PILLOW):
            if ("service", 32) in by and (naive, 32) in by and by[(naive, 32)]["requests_per_s"]:
                ratio = by[("service", 32)]["requests_per_s"] / by[(naive, 32)]["requests_per_s"]
                print(f"  service against {naive} at c=32: {ratio:.2f}x img/s")
        if ("service", 1) in by and ("naive", 1) in by:
            gap = by[("service", 1)]["p50_ms"] - by[("naive", 1)]["p50_ms"]
            print(f"  target 2: service p50 at c=1 is {gap:+.2f} ms from the naive endpoint's (goal <= +2 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated connection counts")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per point and target")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds the duration is split into")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per ceiling configuration")
    parser.add_argument("--images", type=int, default=64, help="distinct JPEG files cycled through")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (it shares the cores with the server)")
    parser.add_argument("--service-args", default="", help="extra flags for python -m service, e.g. '--max-batch-size 16'")
    parser.add_argument(
        "--tuned",
        action="store_true",
        help="serve at flags taken from the ceiling's search (service.measure.service_setting), not at the service's defaults",
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--naive-pillow",
        action="store_true",
        help=f"also load the naive endpoint decoding every image with Pillow ({NAIVE_PILLOW}), as a hand-written one does",
    )
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-cache", help="where the MobileNetV2 export is kept")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "serve_bench.json", help="where to write the figures")
    parser.add_argument("--grpc-load", nargs=4, metavar=("TARGET", "REQUESTS", "CONCURRENCY", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grpc_load:
        target, requests, concurrency, seconds = args.grpc_load
        print(json.dumps(asyncio.run(grpc_load(target, read_requests(Path(requests)), int(concurrency), float(seconds)))))
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian/Ubuntu) or brew install wrk")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    records = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for name in args.models.split(","):
            if name not in MODELS:
                sys.exit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
            records.append(bench_model(name, args, Path(tmp)))
    print_table(records)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "duration_s": args.duration, "results": records}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
