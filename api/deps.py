"""Dependencies of the routes, as Annotated aliases. Everything comes from app.state (set by create_app)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session, sessionmaker

from api.auth import Principal, authorize
from api.metrics import ApiMetrics
from service.config import Settings
from service.errors import Unavailable
from service.inference import InferenceBackend
from service.queue import OperationQueue

bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_ledger(request: Request) -> sessionmaker[Session]:
    return request.app.state.ledger


def get_queue(request: Request) -> OperationQueue:
    return request.app.state.queue


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def get_backend(request: Request) -> InferenceBackend:
    backend = request.app.state.backend
    if backend is None:
        raise Unavailable("no inference backend configured: this API process only records edits; run the "
                          "worker and set KNOWPATCH_WORKER_URL to serve generation")
    return backend


def get_principal(scopes: SecurityScopes, request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    token = credentials.credentials if credentials is not None else None  # None also for a non-Bearer scheme
    return authorize(request.app.state.api_keys, token, scopes.scopes)


SettingsDep = Annotated[Settings, Depends(get_settings)]
LedgerDep = Annotated[sessionmaker[Session], Depends(get_ledger)]
QueueDep = Annotated[OperationQueue, Depends(get_queue)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
BackendDep = Annotated[InferenceBackend, Depends(get_backend)]

GenerateCaller = Annotated[Principal, Security(get_principal, scopes=["generate"])]
EditWriter = Annotated[Principal, Security(get_principal, scopes=["edits:write"])]
EditAdmin = Annotated[Principal, Security(get_principal, scopes=["edits:admin"])]


async def get_model_name(request: Request, backend: BackendDep) -> str:
    """The served model's name, asked of the backend once and then kept (it does not change)."""
    name = getattr(request.app.state, "model_name", None)
    if name is None:
        name = request.app.state.model_name = (await backend.info()).model
    return name


ModelNameDep = Annotated[str, Depends(get_model_name)]
