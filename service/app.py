"""The application factory: settings in, a FastAPI app out; models load in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .dataplane import DataPlane
from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import BodySizeLimit, PredictionGate
from .page import router as page_router
from .registry import Registry
from .routes import protected, require_api_key, router
from .runtime import Device
from .settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """Image classifiers trained with Keras, exported to ONNX, served by onnxruntime.

Upload images to `POST /predict/{model}` as `multipart/form-data` parts named `files`; concurrent
requests are batched together. Every error answers JSON with a human-readable `detail`; a 503
carries `Retry-After`."""


# What builds the app's registry: the Registry itself, or a front end's mirror of the owner's (service/mirror.py).
RegistryFactory = Callable[[Settings, Device, Metrics, Executor], Registry]


def create_app(
    settings: Settings, device: Device, *, metrics: Metrics | None = None, registry_factory: RegistryFactory = Registry
) -> FastAPI:
    """The service for `settings` on `device` (from `startup.prepare_process`); models load in the lifespan."""
    metrics = metrics if metrics is not None else Metrics()
    # Decoding runs here, never on the event loop; Pillow releases the GIL while it works. Its memory
    # is bounded: at most this many images of at most max_image_pixels decode at once.
    decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers or os.cpu_count() or 1, thread_name_prefix="decode")
    registry = registry_factory(settings, device, metrics, decode_pool)
    dataplane = DataPlane(settings, registry, metrics, decode_pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading happens before the port opens, off the loop so the lifespan stays responsive.
        await asyncio.to_thread(registry.load_all)
        registry.start()
        watcher = asyncio.create_task(registry.watch(settings.watch_interval_s)) if settings.watch_interval_s > 0 else None
        ready = sum(m.state == "ready" for m in registry.all())
        log.info("serving %d of %d model versions from %s", ready, len(registry.all()), settings.repository)
        try:
            yield
        finally:
            # uvicorn has stopped taking requests and waited for those in flight; queued images finish here.
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await registry.close()
            decode_pool.shutdown(wait=True)

    app = FastAPI(title="keras-onnx-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.dataplane = dataplane
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(page_router)
    app.include_router(protected, dependencies=[Depends(require_api_key)] if settings.api_key else None)
    # The last added runs first: CORS answers pre-flights and decorates every answer, the gate refuses
    # early and sees every status (413 included), the size limit sits right in front of the body parser.
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
