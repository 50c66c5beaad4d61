"""The application factory: settings in, a FastAPI app out; models load in the lifespan."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from .errors import install_error_handlers
from .registry import Registry
from .routes import router
from .settings import Settings

DESCRIPTION = """Image classifiers trained with Keras, exported to ONNX, served by onnxruntime.

Upload images to `POST /predict/{model}` as `multipart/form-data` parts named `files`.
Every error answers JSON with a human-readable `detail`."""


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings)
        app.state.registry = registry
        registry.load_all()
        yield

    app = FastAPI(title="keras-onnx-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = Registry(settings)  # empty until the lifespan loads it
    install_error_handlers(app)
    app.include_router(router)
    return app
