"""HTTP routes: parse, call the logic layer, shape the answer."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, File, Path, Query, Request, Security, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Scope

from .dataplane import Classification, DataPlane, Deadline, EncodedImage
from .errors import (
    BadRequest,
    DeadlineExceeded,
    ImageTooLarge,
    InferenceFailed,
    ModelFailed,
    ModelNotFound,
    ModelNotReady,
    OutOfMemory,
    PayloadTooLarge,
    QueueFull,
    Unauthorized,
    UnsupportedImage,
    error_responses,
)
from .metrics import CONTENT_TYPE
from .middleware import ARRIVAL_KEY
from .model_settings import in_force
from .registry import Registry, ServedModel
from .schemas import ClassScore, DeviceInfo, HealthResponse, ModelHealth, ModelInfo, ModelsResponse, Prediction, PredictResponse

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed only when the service has an API key.")
_bearer = HTTPBearer(auto_error=False, description="The API key as a Bearer token, instead of X-API-Key.")


async def require_api_key(
    request: Request,
    key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Refuse the request with 401 when an API key is configured and not given."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    given = key or (bearer.credentials if bearer else None)
    # Constant-time comparison: the answer's timing must not reveal how much of the key matched.
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("missing or wrong API key: send it in the X-API-Key header or as a Bearer token")


router = APIRouter()
# Routes that need the API key when one is configured; the app adds `require_api_key` to them only
# then, so a service without a key does not check one (their 401 stays documented, since the same
# client code may meet a service with a key).
protected = APIRouter()


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def _info(m: ServedModel) -> ModelInfo:
    meta = m.metadata
    return ModelInfo(
        name=m.name,
        version=m.version,
        state=m.state,
        error=m.error,
        providers=m.providers,
        file=m.path.name,
        precision=m.precision,
        input_shape=list(meta.input_shape) if meta else None,
        color_mode=meta.color_mode if meta else None,
        resize_method=meta.resize_method if meta else None,
        labels=meta.labels if meta else None,
        architecture=meta.architecture if meta else None,
        dataset=meta.dataset if meta else None,
        metrics=meta.metrics if meta else None,
        parity=meta.parity if meta else None,
        settings=in_force(m.settings) if m.settings else None,
        settings_from_file=sorted(m.overrides),
    )


@protected.post(
    "/predict/{model}",
    response_model=PredictResponse,
    summary="Classify one or more images",
    description="Images are decoded, resized as in training, and batched with other requests' images. "
    "`predictions` follow the order of the uploaded files.",
    responses=error_responses(
        Unauthorized,
        ModelNotFound,
        PayloadTooLarge,
        ImageTooLarge,
        UnsupportedImage,
        BadRequest,
        QueueFull,
        ModelNotReady,
        ModelFailed,
        OutOfMemory,
        DeadlineExceeded,
        InferenceFailed,
    ),
)
async def predict_route(
    request: Request,
    model: Annotated[str, Path(description="Served model name.", examples=["digits"])],
    files: Annotated[list[UploadFile], File(description="Images: JPEG, PNG, WebP, BMP, GIF (first frame), TIFF.")],
    top_k: Annotated[int, Query(ge=1, description="How many classes to return per image (capped at the number of classes).")] = 5,
    version: Annotated[int | None, Query(ge=1, description="Model version; the highest ready one when left out.")] = None,
) -> Response:
    # The common upload is answered before it reaches this route (service/fastpredict.py), by the same `predict`.
    dataplane: DataPlane = request.app.state.dataplane
    images = [EncodedImage(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]
    return await predict(dataplane, model, version, images, top_k, request.scope)


async def predict(
    dataplane: DataPlane, model: str, version: int | None, images: list[EncodedImage], top_k: int, scope: Scope
) -> Response:
    """Classify one request's uploaded images and build its answer; raises a ServiceError."""
    dataplane.admit(model, version, len(images))
    deadline = Deadline(scope.get(ARRIVAL_KEY, time.monotonic()))
    result = await dataplane.classify_files(model, version, images, deadline, protocol="multipart")
    # Serialised straight from the model we built, rather than validated again against
    # `response_model` (which still documents the shape): that is a fair share of a request's CPU.
    return Response(_predict_answer(result, images, top_k).model_dump_json(), media_type="application/json")


def _predict_answer(result: Classification, images: list[EncodedImage], top_k: int) -> PredictResponse:
    predictions = []
    for row, image in enumerate(images):
        scores = [ClassScore(label=label, index=index, probability=p) for index, label, p in result.top_k(row, top_k)]
        predictions.append(
            Prediction(filename=image.filename, label=scores[0].label, probability=scores[0].probability, top_k=scores)
        )
    return PredictResponse(model=result.model, version=result.version, predictions=predictions)


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Ready when every model has a version loaded and warmed",
    description="Readiness, for load balancers and readiness probes (policy: --readiness-policy). Liveness is GET /livez.",
    responses={
        503: {
            "model": HealthResponse,
            "description": "Loading at start-up, draining for shutdown, a model has no ready version, or none is served.",
        }
    },
)
async def health(request: Request) -> JSONResponse:
    registry = _registry(request)
    models = registry.all()
    # Readiness is per model name under --readiness-policy (lifecycle.py), and 503 while loading or
    # draining; the body lists every version's state, also of those that do not count for readiness.
    ready, reason = request.app.state.dataplane.readiness()
    phase = request.app.state.lifecycle.phase
    body = HealthResponse(
        status="ready" if ready else phase if phase != "serving" else "unavailable",
        reason=reason,
        device=DeviceInfo(providers=list(registry.device.providers), reason=registry.device.reason),
        models=[ModelHealth(name=m.name, version=m.version, state=m.state, providers=m.providers, error=m.error) for m in models],
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.head("/health", include_in_schema=False)
async def health_head(request: Request) -> Response:
    """The same status as GET /health, for load balancers that probe with HEAD."""
    return Response(status_code=(await health(request)).status_code)


@protected.get(
    "/models",
    response_model=ModelsResponse,
    summary="Every served model and version",
    responses=error_responses(Unauthorized),
)
async def list_models(request: Request) -> ModelsResponse:
    return ModelsResponse(models=[_info(m) for m in _registry(request).all()])


@protected.get(
    "/models/{model}",
    response_model=ModelsResponse,
    summary="The versions of one model",
    responses=error_responses(Unauthorized, ModelNotFound),
)
async def get_model(
    request: Request, model: Annotated[str, Path(description="Served model name.", examples=["digits"])]
) -> ModelsResponse:
    return ModelsResponse(models=[_info(m) for m in _registry(request).versions(model)])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"example": 'kos_requests_total{model="digits",status="200"} 42.0'}}}},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
