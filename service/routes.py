"""HTTP routes: parse, call the logic layer, shape the answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from .errors import BadRequest
from .inference import Upload, predict
from .registry import Registry, ServedModel
from .schemas import ErrorResponse, HealthResponse, ModelHealth, ModelInfo, ModelsResponse, PredictResponse

router = APIRouter()


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


def _info(m: ServedModel) -> ModelInfo:
    meta = m.metadata
    return ModelInfo(
        name=m.name,
        version=m.version,
        state=m.state,
        error=m.error,
        providers=m.providers,
        input_shape=list(meta.input_shape) if meta else None,
        color_mode=meta.color_mode if meta else None,
        resize_method=meta.resize_method if meta else None,
        labels=meta.labels if meta else None,
        architecture=meta.architecture if meta else None,
        dataset=meta.dataset if meta else None,
        metrics=meta.metrics if meta else None,
    )


@router.post(
    "/predict/{model}",
    response_model=PredictResponse,
    summary="Classify one or more images",
    responses={
        404: _error("Unknown model or version."),
        413: _error("Image too large."),
        415: _error("A file is not a supported image; the detail names it."),
        422: _error("Malformed request: no files, bad top_k."),
        503: _error("Model not ready; retry after the Retry-After header."),
    },
)
async def predict_route(
    request: Request,
    model: Annotated[str, Path(description="Served model name.", examples=["digits"])],
    files: Annotated[list[UploadFile], File(description="Images: JPEG, PNG, WebP, BMP, GIF (first frame), TIFF.")],
    top_k: Annotated[int, Query(ge=1, description="How many classes to return per image (capped at the number of classes).")] = 5,
    version: Annotated[int | None, Query(ge=1, description="Model version; the highest when left out.")] = None,
) -> PredictResponse:
    settings = request.app.state.settings
    served = _registry(request).get(model, version)
    if len(files) > settings.max_files_per_request:
        raise BadRequest(f"{len(files)} files is more than the limit of {settings.max_files_per_request} per request")
    uploads = [Upload(filename=f.filename or f"file{i}", data=await f.read()) for i, f in enumerate(files)]
    return await predict(served, uploads, top_k, settings.max_image_pixels)


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Ready when every model is loaded and warmed",
    responses={503: {"model": HealthResponse, "description": "A model is not ready (or none is served)."}},
)
async def health(request: Request) -> JSONResponse:
    models = _registry(request).all()
    ready = bool(models) and all(m.state == "ready" for m in models)
    body = HealthResponse(
        status="ready" if ready else "unavailable",
        models=[ModelHealth(name=m.name, version=m.version, state=m.state, providers=m.providers, error=m.error) for m in models],
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/models", response_model=ModelsResponse, summary="Every served model and version")
async def list_models(request: Request) -> ModelsResponse:
    return ModelsResponse(models=[_info(m) for m in _registry(request).all()])


@router.get(
    "/models/{model}",
    response_model=ModelsResponse,
    summary="The versions of one model",
    responses={404: _error("Unknown model.")},
)
async def get_model(request: Request, model: str) -> ModelsResponse:
    return ModelsResponse(models=[_info(m) for m in _registry(request).versions(model)])
