"""What shedding load costs: a flood of connections against a full queue, one process beside front ends.

Each shape of the service (`--frontends 1`, `--frontends 2`, ...) serves a model slower than the
flood (a generated ONNX file of six convolutions over 128x128 RGB, tens of ms per image) with a
small queue, so the queue is full nearly all the time and most requests are refused 503 with
Retry-After. 200 connections, each sending its next one-image upload as soon as it has its answer,
flood each shape in turn for a bounded time. Printed per shape: how many answers of each status,
and the p50 and p99 of the 503 answers and of the served (200) answers, from the request's first
byte sent to its answer's last byte read. The goal for the 503s: a p99 under 50 ms on 2 cores,
where a refusal costs a path lookup and a read of the queue, not a multipart parse.

    python benchmarks/overload_bench.py                        # 1 and 2 front ends, 200 connections, 5 s each
    python benchmarks/overload_bench.py --frontends 1,2,3 --duration 10

The client is plain asyncio sockets with the request's bytes built once, so that it costs the
machine far less than the service it floods (an HTTP library would be the bottleneck itself).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def slow_model(folder: Path, size: int = 128) -> Path:
    """A real ONNX file without a training stack: size x size RGB, six 32-channel convolutions, tens of ms per image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sys.path.insert(0, str(ROOT))
    from kos_core.artifact import ModelMetadata

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["x"], ["c0"], perm=[0, 3, 1, 2]),
    ]
    weights, channels = [], 3
    for i in range(6):
        weights.append(numpy_helper.from_array(rng.normal(0, 0.05, (32, channels, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [f"c{i}", f"w{i}"], [f"v{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"v{i}"], [f"c{i + 1}"]))
        channels = 32
    weights.append(numpy_helper.from_array(rng.normal(0, 0.1, (32, 2)).astype(np.float32), "dense"))
    nodes += [
        helper.make_node("GlobalAveragePool", ["c6"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    metadata = ModelMetadata(
        name="slow",
        labels=["yes", "no"],
        height=size,
        width=size,
        channels=3,
        color_mode="rgb",
        architecture="slow",
        dataset="none",
    )
    for key, value in metadata.to_metadata_props().items():
        model.metadata_props.add(key=key, value=value)
    path = folder / f"slow{size}.onnx"
    onnx.save(model, path)
    return path


def multipart_request(host: str, port: int, path: str, filename: str, data: bytes, content_type: str = "image/jpeg") -> bytes:
    """One POST of one file part named `files`, as raw HTTP/1.1 bytes (keep-alive)."""
    boundary = "overloadbenchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 answer: its status, and whether the server closes the connection after it."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, closing = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            closing = True
    await reader.readexactly(length)
    return status, closing


async def flood(host: str, port: int, request: bytes, connections: int, seconds: float) -> list[tuple[int, float]]:
    """`connections` clients, each sending `request` again as soon as it is answered, for `seconds`: (status, seconds) each.

    A connection the server closes or resets is opened again; such a failure is recorded as status 0.
    """
    answers: list[tuple[int, float]] = []
    until = time.monotonic() + seconds

    async def client() -> None:
        reader = writer = None
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                writer.write(request)
                status, closing = await _answer(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                answers.append((0, time.perf_counter() - started))
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
                continue
            answers.append((status, time.perf_counter() - started))
            if closing:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    # The client's own garbage collections would stall every connection at once and count as the
    # server's latency: none during the flood (what it allocates is bounded by the answers list).
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        await asyncio.gather(*(client() for _ in range(connections)))
    finally:
        gc.enable()
        gc.unfreeze()
    return answers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


def summary(answers: list[tuple[int, float]], seconds: float) -> dict:
    by_status: dict[int, list[float]] = {}
    for status, took in answers:
        by_status.setdefault(status, []).append(took * 1000)
    figures: dict = {"answers_per_s": len(answers) / seconds, "counts": {str(k): len(v) for k, v in sorted(by_status.items())}}
    for status in (503, 200):
        taken = by_status.get(status, [])
        figures[str(status)] = {
            "p50_ms": statistics.median(taken) if taken else None,
            "p99_ms": percentile(taken, 99) if taken else None,
        }
    return figures


def jpeg(size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frontends", default="1,2", help="comma-separated --frontends values, flooded one after another")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of flood per shape")
    parser.add_argument("--queue-size", type=int, default=8, help="the service's --queue-size: small, so that it is full")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "overload_bench.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_bench import start_service, stop

    work = Path(tempfile.mkdtemp(prefix="overload-bench-"))
    model = work / "models" / "slow" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    slow_model(work).rename(model)
    upload = jpeg(128)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results = {}
    for n in [int(v) for v in args.frontends.split(",")]:
        flags = ["--frontends", str(n), "--queue-size", str(args.queue_size), "--max-files-per-request", "1"]
        process, port = start_service(work / "models", [*flags, "--max-batch-size", "4"])
        try:
            request = multipart_request("127.0.0.1", port, "/predict/slow", "noise.jpg", upload)
            asyncio.run(flood("127.0.0.1", port, request, args.connections, 1.0))  # warm-up, not counted
            answers = asyncio.run(flood("127.0.0.1", port, request, args.connections, args.duration))
        finally:
            stop(process)
        results[n] = summary(answers, args.duration)
        r = results[n]

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:7.1f}"

        print(
            f"--frontends {n}: {r['answers_per_s']:7.1f} answers/s {r['counts']}  "
            f"503 p50 {ms(r['503']['p50_ms'])} ms p99 {ms(r['503']['p99_ms'])} ms  "
            f"200 p50 {ms(r['200']['p50_ms'])} ms p99 {ms(r['200']['p99_ms'])} ms",
            flush=True,
        )
    print(f"{args.connections} connections, {args.duration:g} s per shape, queue size {args.queue_size}, {os.cpu_count()} CPUs")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"connections": args.connections, "duration_s": args.duration, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
