"""Liveness: whether the process still works, apart from readiness (GET /health)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .schemas import LivenessResponse

probes = APIRouter()


@probes.get(
    "/livez",
    response_model=LivenessResponse,
    summary="Live while the process works, also while models load or after one failed to load",
    description="For a liveness probe: 503 only when the service is stuck (its event loop stalled, or a model's batcher "
    "stopped), which a restart cures. Readiness, for load balancers and readiness probes, is GET /health.",
    responses={503: {"model": LivenessResponse, "description": "The service is stuck; restart it."}},
)
async def livez(request: Request) -> JSONResponse:
    live, reason = request.app.state.dataplane.liveness()
    body = LivenessResponse(status="live" if live else "stuck", reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if live else 503)


@probes.head("/livez", include_in_schema=False)
async def livez_head(request: Request) -> Response:
    return Response(status_code=200 if request.app.state.dataplane.liveness()[0] else 503)
