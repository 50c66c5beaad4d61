"""The application factory: settings in, a FastAPI app out; models load in the lifespan."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig

from kos_core.cpus import available_cpus

from .dataplane import DataPlane
from .errors import install_error_handlers
from .fastpredict import FastPredict
from .lifecycle import Lifecycle, ModelStateCollector
from .metrics import Metrics
from .middleware import BodySizeLimit, PredictionGate
from .page import router as page_router
from .probes import probes
from .registry import Registry
from .routes import protected, require_api_key, router
from .runtime import Device, name_os_thread
from .settings import Settings
from .v2 import rest as v2_rest
from .v2.grpc_service import create_grpc_server, stop_grpc_server

log = logging.getLogger(__name__)

DESCRIPTION = """Image classifiers trained with Keras, exported to ONNX, served by onnxruntime.

Upload images to `POST /predict/{model}` as `multipart/form-data` parts named `files`; concurrent
requests are batched together. Every error answers JSON with a human-readable `detail`; a 503
carries `Retry-After`.

The Open Inference Protocol (KServe v2 / Triton) is served beside it: `/v2/...` here (health,
metadata, model configuration, infer with the binary tensor data and classification extensions;
errors `{"error": ...}`), and the same over gRPC on its own port (`--grpc-port`). Standard clients
such as tritonclient work unchanged."""


# What builds the app's registry: the Registry itself, or a front end's mirror of the owner's (service/mirror.py).
RegistryFactory = Callable[[Settings, Device, Metrics, Executor], Registry]


# The standard OpenTelemetry variables that configure an exporter (opentelemetry-instrument, the OTel Operator).
OTEL_EXPORTER_VARIABLES = ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT")


def telemetry_config() -> TelemetryConfig:
    """FastAPI's own OpenTelemetry spans and metrics: on where the environment configures an exporter (not "none";
    OTEL_SDK_DISABLED=true wins), else off.

    Off, FastAPI skips asking OpenTelemetry's global providers (and the environment) whether to
    record each request: a few per cent of the event loop's time per request, and of a 503's cost.
    """
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    wanted = not disabled and any(
        os.environ.get(name, "").strip().lower() not in ("", "none") for name in OTEL_EXPORTER_VARIABLES
    )
    return {"tracing": wanted, "metrics": wanted, "logs": wanted}


def create_app(
    settings: Settings,
    device: Device,
    *,
    metrics: Metrics | None = None,
    registry_factory: RegistryFactory = Registry,
    grpc_shared_port: bool = False,
) -> FastAPI:
    """The service for `settings` on `device` (from `startup.prepare_process`); models load in the lifespan.

    `grpc_shared_port`: this app is one of several front ends, each serving gRPC on the same port (SO_REUSEPORT).
    """
    metrics = metrics if metrics is not None else Metrics()
    # Decoding runs here, never on the event loop; Pillow releases the GIL while it works. Its memory
    # is bounded: at most this many images of at most max_image_pixels decode at once. Sized by the
    # CPUs the container may use (its cgroup quota), not the host's cores.
    decode_pool = ThreadPoolExecutor(
        max_workers=settings.decode_workers or available_cpus(),
        thread_name_prefix="decode",
        initializer=functools.partial(name_os_thread, "kos-decode"),
    )
    registry = registry_factory(settings, device, metrics, decode_pool)
    lifecycle = Lifecycle(settings, registry)
    dataplane = DataPlane(settings, registry, metrics, decode_pool, readiness=lifecycle.readiness, liveness=lifecycle.liveness)
    metrics.add_collector(ModelStateCollector(lifecycle))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The Open Inference Protocol's gRPC service: this process and event loop, so every protocol
        # feeds the same batchers. It opens before the models load, as the HTTP port does (server.py),
        # so that its liveness and readiness RPCs answer while they load.
        grpc_server, grpc_port = None, 0
        if settings.grpc_port:
            grpc_server, grpc_port = create_grpc_server(dataplane, settings, app.state, shared_port=grpc_shared_port)
            await grpc_server.start()
            log.info("Open Inference Protocol over gRPC on %s:%d", settings.host, grpc_port)
        # Models load and warm here; the server has opened its port already (server.py), so probes answer meanwhile.
        await lifecycle.start()
        try:
            yield
        finally:
            # The server has drained connections and requests in flight; gRPC takes no new calls from here
            # and gives those in flight up to the shutdown timeout; queued images finish in lifecycle.stop().
            if grpc_server is not None:
                await stop_grpc_server(grpc_server, grpc_port, settings.shutdown_timeout_s)
            await lifecycle.stop()
            decode_pool.shutdown(wait=True)

    app = FastAPI(
        title="keras-onnx-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, telemetry=telemetry_config()
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.dataplane = dataplane
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    # Routes are matched in the order they are added, each candidate costing the event loop a few
    # microseconds, so the prediction routes come first: no other path overlaps them.
    app.include_router(protected, dependencies=[Depends(require_api_key)] if settings.api_key else None)
    app.include_router(router)
    app.include_router(probes)
    app.include_router(page_router)
    app.include_router(v2_rest.public)
    app.include_router(v2_rest.models, dependencies=[Depends(require_api_key)] if settings.api_key else None)
    # The last added runs first: CORS answers pre-flights and decorates every answer, the gate refuses
    # early and sees every status (413 included), the size limit sits right in front of the body
    # parsers: the fast path's for the common upload (service/fastpredict.py), then the routes'.
    app.add_middleware(FastPredict, dataplane=dataplane, api_key=settings.api_key)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(PredictionGate, dataplane=dataplane, api_key=settings.api_key)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    return app
