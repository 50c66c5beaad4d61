"""Prometheus metrics, defined once per app in their own registry (no process-wide globals)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latencies from 0.5 ms to about 30 s; batch sizes as powers of two (1, 2, 4, ... 4096).
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH = tuple(float(2**i) for i in range(13))


class Metrics:
    """Every metric the service exports; `render()` gives the Prometheus text format.

    With `multiprocess_dir` (several processes, each with PROMETHEUS_MULTIPROC_DIR set to it before
    prometheus_client was imported), `render()` sums the series of every process of the service.
    """

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self._collectors: list[Collector] = []  # read at each scrape, from this process's state
        r = self.registry
        self.requests = Counter(
            "kos_requests",
            "Prediction requests answered, by model, status (HTTP, or the HTTP equivalent of a gRPC code) and protocol "
            "(multipart, v2-rest, v2-grpc); 499: the client went away first.",
            ["model", "status", "protocol"],
            registry=r,
        )
        self.request_latency = Histogram(
            "kos_request_latency_seconds",
            "Prediction request latency, arrival to answer.",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.in_progress = Gauge(
            "kos_requests_in_progress", "Prediction requests being handled now.", registry=r, multiprocess_mode="livesum"
        )
        self.images = Counter("kos_images", "Images classified, by model.", ["model"], registry=r)
        self.batch_size = Histogram("kos_batch_size", "Images per onnxruntime run.", ["model"], buckets=_BATCH, registry=r)
        self.queue_wait = Histogram(
            "kos_queue_wait_seconds",
            "Time an image waited in the queue before its batch started.",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.inference = Histogram(
            "kos_inference_seconds", "onnxruntime time per batch.", ["model"], buckets=_SECONDS, registry=r
        )
        self.queue_depth = Gauge(
            "kos_queue_depth",
            "Images waiting in a model version's queue.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batches = Counter(
            "kos_batches",
            "Batches run (a request run alone included), by model and the protocols whose images they held, in name "
            "order joined by '+': protocols=\"multipart+v2-grpc\" counts batches that gathered images of both.",
            ["model", "protocols"],
            registry=r,
        )
        self.batch_failures = Counter("kos_batch_failures", "Batches whose inference raised.", ["model"], registry=r)
        self.expired = Counter(
            "kos_deadline_expired_images", "Images dropped unrun because their deadline passed.", ["model"], registry=r
        )
        self.model_loads = Counter("kos_model_loads", "Model version loads, by outcome.", ["model", "outcome"], registry=r)

    @property
    def _by_model(self) -> list[Counter | Gauge | Histogram]:
        return [m for m in vars(self).values() if isinstance(m, Counter | Gauge | Histogram) and "model" in m._labelnames]

    def observe_request(self, model: str, status: int, protocol: str, seconds: float) -> None:
        """Count one answered prediction request and its latency."""
        self.requests.labels(model, str(status), protocol).inc()
        self.request_latency.labels(model).observe(seconds)

    def forget_model(self, name: str) -> None:
        """Drop every series of a model that is no longer served, so scrapes stop showing stale values."""
        for metric in self._by_model:
            position = metric._labelnames.index("model")
            for key in list(metric._metrics):
                if key[position] == name:
                    metric.remove(*key)

    def add_collector(self, collector: Collector) -> None:
        """A collector that reads its values at each scrape (model states, readiness), beside the metrics above."""
        self._collectors.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        every_process = CollectorRegistry()
        MultiProcessCollector(every_process, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        for collector in self._collectors:
            every_process.register(collector)  # this process's view, which mirrors the owner's
        return generate_latest(every_process)
