"""/health, /ready, /info and /metrics: no authentication, for probes and scrapers."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api import probes
from api.deps import LedgerDep, MetricsDep, QueueDep, SettingsDep
from api.schemas.health import Health, Info, Readiness

router = APIRouter(tags=["operations"])
METRICS_DOC: dict[int | str, dict[str, Any]] = {200: {"content": {"text/plain": {"example": 'knowpatch_edits{status="applied"} 12.0\n'}}}}


@router.get("/health", response_model=Health)
def health() -> Health:
    """Alive: 200 whenever the process answers."""
    return Health()


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def ready(request: Request, ledger: LedgerDep, queue: QueueDep) -> JSONResponse:
    """200 when the ledger and queue answer and the model is loaded with the ledger replayed; else 503."""
    result = await probes.readiness(ledger, queue, request.app.state.backend)
    return JSONResponse(result.model_dump(exclude_none=True), status_code=200 if result.ready else 503)


@router.get("/info", response_model=Info)
async def info(request: Request, settings: SettingsDep, ledger: LedgerDep, queue: QueueDep) -> Info:
    """The model, its version and edit settings, the ledger head and the queue depth."""
    state = request.app.state
    return await probes.info(settings, ledger, queue, state.backend, auth_enabled=bool(state.api_keys))


@router.get("/metrics", response_class=Response, responses=METRICS_DOC)
def metrics(app_metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(app_metrics.render(), media_type=CONTENT_TYPE_LATEST)
