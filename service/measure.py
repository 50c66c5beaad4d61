"""Measure a model on this machine and find its runtime settings: batch size, intra-op threads, batches in flight.

The measurement is in-process, without HTTP: real JPEG files are decoded on every core (as the
service decodes uploads) while batches run in onnxruntime, one to several at a time. It is what
`benchmarks/serve_bench.py` calls the ceiling, and what `python -m service tune` (service/tune.py)
chooses a model's settings from.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from kos_core.cpus import available_cpus
from kos_core.imaging import decode_image

MAX_PIXELS = 40_000_000


@dataclass
class Setting:
    """One runtime setting and what it measured: images per second, and each batch's latency (decode and run)."""

    images_per_s: float
    batch_size: int
    intra_op_threads: int
    spinning: bool
    workers: int = 1  # batches run at the same time (threads calling session.run)
    p50_ms: float = 0.0
    p99_ms: float = 0.0


def sample_jpegs(metadata: ModelMetadata, count: int = 32, seed: int = 0) -> list[bytes]:
    """Photo-like JPEG files (smooth colour fields plus texture) of the model's input size and colour mode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = metadata.height, metadata.width
    yy, xx = np.mgrid[0:height, 0:width]
    blobs = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        scale = max(height, width) / 8
        channels = [
            127 + 100 * np.sin(xx / (scale * rng.uniform(0.5, 2)) + yy / (scale * rng.uniform(0.5, 2)) + p) for p in phase
        ]
        array = np.clip(np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="RGB")
        if metadata.channels == 1:
            image = image.convert("L")
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        blobs.append(out.getvalue())
    return blobs


class Pipeline:
    """The in-process rate at one setting: decode on every core while the previous batch runs."""

    def __init__(self, path: Path, blobs: list[bytes], batch: int, intra: int, spinning: bool, workers: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.spec = ModelMetadata.from_metadata_props(self.session.get_modelmeta().custom_metadata_map)
        self.blobs, self.batch, self.workers = blobs, batch, workers
        self.setting = Setting(0.0, batch, intra, spinning, workers)
        self.run(np.zeros((batch, *self.spec.input_shape), np.uint8))

    def run(self, images: np.ndarray) -> np.ndarray:
        probabilities: np.ndarray = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        return probabilities

    def rate(self, seconds: float) -> float:
        """Images per second over about `seconds`, with `workers` batches in flight at once.

        Also records in `setting` the p50 and p99 of the batches' latencies: from the first image's
        decode starting to the batch's answer, what an image waits for at the least.
        """
        latencies: list[float] = []
        with ThreadPoolExecutor(available_cpus()) as pool:

            def decode_batch(start: int) -> tuple[float, list[Future[np.ndarray]]]:
                began = time.perf_counter()
                futures = [
                    pool.submit(decode_image, self.blobs[(start + i) % len(self.blobs)], "x", self.spec.input_spec, MAX_PIXELS)
                    for i in range(self.batch)
                ]
                return began, futures

            def worker(offset: int) -> int:
                done, start = 0, offset
                pending = decode_batch(start)
                while time.perf_counter() - began < seconds:
                    submitted, futures = pending
                    images = np.stack([f.result() for f in futures])
                    start += self.batch * self.workers
                    pending = decode_batch(start)  # decoded while this batch runs
                    self.run(images)
                    latencies.append(time.perf_counter() - submitted)
                    done += self.batch
                for f in pending[1]:
                    f.result()
                return done

            began = time.perf_counter()
            with ThreadPoolExecutor(self.workers) as runners:
                done = sum(runners.map(worker, [w * self.batch for w in range(self.workers)]))
            images_per_s = done / (time.perf_counter() - began)
        self.setting.images_per_s = images_per_s
        if latencies:
            self.setting.p50_ms = float(np.percentile(latencies, 50) * 1000)
            self.setting.p99_ms = float(np.percentile(latencies, 99) * 1000)
        return images_per_s


Report = Callable[[str], None]


def search(
    path: Path,
    blobs: list[bytes],
    seconds: float,
    candidates: list[tuple[int, int, bool, int]],
    report: Report,
) -> tuple[Pipeline, list[Setting]]:
    """Measure every (batch size, intra-op threads, spinning, batches in flight) for `seconds`; the fastest, and all tried."""
    best: Pipeline | None = None
    tried = []
    for step, (batch, intra, spinning, workers) in enumerate(candidates, 1):
        pipeline = Pipeline(path, blobs, batch, intra, spinning, workers)
        pipeline.rate(seconds)
        s = pipeline.setting
        tried.append(s)
        report(
            f"[{step}/{len(candidates)}] batch {batch:3d}, intra-op threads {intra}, spinning {spinning!s:5}, "
            f"batches in flight {workers}: {s.images_per_s:8.1f} images/s, p50 {s.p50_ms:7.2f} ms, p99 {s.p99_ms:7.2f} ms"
        )
        if best is None or s.images_per_s > best.setting.images_per_s:
            best = pipeline
    assert best is not None, "no candidates"
    return best, tried


def ceiling_candidates(batch_sizes: list[int], cpus: int) -> list[tuple[int, int, bool, int]]:
    """The benchmark's full search: batches in flight (1, 2), intra-op threads (1, all), spinning (on, off), each batch size."""
    return [
        (batch, intra, spinning, workers)
        for workers in sorted({1, 2})
        for intra in sorted({1, cpus})
        for spinning in (True, False)
        for batch in batch_sizes
    ]


def best_pipeline(
    path: Path, blobs: list[bytes], seconds: float, batch_sizes: list[int], report: Report = print
) -> tuple[Pipeline, list[Setting]]:
    """Search batch size, intra-op threads, spinning and batches in flight for the highest in-process images/s."""
    return search(path, blobs, seconds, ceiling_candidates(batch_sizes, available_cpus()), report)


def service_setting(best: Setting, tried: list[Setting], tolerance: float = 0.10, cpus: int | None = None) -> list[str]:
    """The service's flags, chosen from the settings a search tried for this model here.

    Of the settings within `tolerance` of the best rate (on a shared machine the search's rates
    move by 5 to 10 % from run to run), the service takes the one with the fewest intra-op
    threads, then the most batches in flight, then the largest batch. In a server, a batch split
    over several threads stalls at every step of the graph whenever HTTP or decoding preempts one
    of them, while one-thread batches side by side do not wait for each other. And every batch
    costs a trip through the event loop and the thread pool, which the in-process search does not
    pay: with MobileNetV2 at concurrency 32, a batch cap of 8 or 32 served 14 % more images per
    second than a cap of 1 (paired runs), though the search rated the three within 11 %. Spinning
    stays off whatever the search liked: with no HTTP to parse, spinning threads cost it
    nothing, but in the service they take the cores that parse requests and decode images. With
    fewer intra-op threads than cores, a request arriving at an idle model runs on a second
    session with every core (--lone-request-threads), so low load keeps a whole-machine latency.
    """
    cores = cpus or available_cpus()
    near = [t for t in tried if t.images_per_s >= (1 - tolerance) * best.images_per_s]
    chosen = min(near, key=lambda t: (t.intra_op_threads, -t.workers, -t.batch_size))
    return [part for name, value in flags_of(chosen, cores).items() for part in (f"--{name.replace('_', '-')}", str(value))]


def flags_of(chosen: Setting, cores: int) -> dict[str, int]:
    """The service settings that run `chosen`: batch cap, threads, workers, and the lone-request session."""
    return {
        "max_batch_size": chosen.batch_size,
        "intra_op_threads": chosen.intra_op_threads,
        "inference_workers": chosen.workers,
        "lone_request_threads": cores if chosen.intra_op_threads < cores else 0,
    }
