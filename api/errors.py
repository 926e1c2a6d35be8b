"""The one error handler: every failure becomes {"error": {"type", "message"}} with its status."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.schemas.common import UNION_TAGS
from service.errors import KnowpatchError, Unauthorized, Unavailable

log = logging.getLogger(__name__)

ERROR_DOCS = {  # status: (error type, description), for the OpenAPI document
    400: ("InvalidRequest", "malformed JSON; nothing was written"),
    401: ("Unauthorized", "missing or unknown API key"),
    403: ("Forbidden", "the key lacks the scope this route needs"),
    404: ("NotFound", "no such edit"),
    409: ("Conflict", "the edit's state (or an Idempotency-Key reuse) forbids this"),
    422: ("InvalidRequest", "invalid input; nothing was written"),
    429: ("Overloaded", "a bounded queue is full (edits: KNOWPATCH_MAX_QUEUED or the per-key bound; generation: "
                        "the decoding queue); nothing was written or started; retry after Retry-After seconds"),
    503: ("Unavailable", "the ledger database or the worker is unreachable, no inference backend, or "
                         "min_model_version is not live; retry after Retry-After seconds"),
}
# Seconds a client should wait before retrying a 503: a ledger database restarting, a worker
# replaying, a queued edit going live all take seconds.
RETRY_AFTER_S = 5


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, with an example body each."""
    return {s: {"description": ERROR_DOCS[s][1],
                "content": {"application/json": {"example": error_body(*ERROR_DOCS[s])}}} for s in statuses}


def field_path(loc: Sequence[int | str]) -> str:
    """('body', 'edits', 0, 'subject') -> 'edits[0].subject'; query/header/path params by name."""
    parts = [p for p in loc[1:] if p not in UNION_TAGS] if loc and loc[0] == "body" else list(loc[1:])
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or ("the request body" if loc and loc[0] == "body" else str(loc[-1] if loc else "request"))


def describe_validation(errors: Iterable[dict[str, Any]]) -> tuple[int, str]:
    errors = list(errors)
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken is not None:
        detail = (broken.get("ctx") or {}).get("error", "")
        return 400, f"request body is not valid JSON ({detail}); send a JSON object with Content-Type: application/json"
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return 422, "the request body is missing: send a JSON object with Content-Type: application/json"
    lines = []
    for e in errors:
        where = field_path(e.get("loc", ()))
        msg = "this field is required" if e.get("type") == "missing" else e.get("msg", "invalid value")
        lines.append(f"{where}: {msg}")
    return 422, "invalid request: " + "; ".join(lines)


# Probed in this order for a 405's Allow header.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route serves on the request's path. Starlette's 405 names those of the first
    route that matches the path only (GET /edits and POST /edits are two routes); asking every route
    whether it would take each method uses only the routes' public matches()."""
    routes = request.app.router.routes
    return [method for method in HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


def _http_error(request: Request, exc: StarletteHTTPException) -> tuple[int, str, str, dict[str, str]]:
    headers = dict(exc.headers or {})
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no route {request.method} {request.url.path}; the routes are listed at GET /docs"
        return 404, "NotFound", message, headers
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request)) or headers.get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; use {headers['Allow']}"
        return 405, "MethodNotAllowed", message, headers
    try:
        name = HTTPStatus(exc.status_code).phrase.replace(" ", "")
    except ValueError:
        name = "HTTPError"
    return exc.status_code, name, str(exc.detail), headers


def _describe(request: Request, exc: Exception) -> tuple[int, str, str, dict[str, str]]:
    if isinstance(exc, KnowpatchError):
        headers = {"WWW-Authenticate": 'Bearer realm="knowpatch"'} if isinstance(exc, Unauthorized) else {}
        if isinstance(exc, Unavailable):  # the ledger's outages arrive as Unavailable too (ledger.db)
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return exc.status, type(exc).__name__, exc.message, headers
    if isinstance(exc, RequestValidationError):
        status, message = describe_validation(exc.errors())
        return status, "InvalidRequest", message, {}
    if isinstance(exc, StarletteHTTPException):
        return _http_error(request, exc)
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return 500, "InternalError", "internal error; the server log has the details", {}


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    status, error_type, message, headers = _describe(request, exc)
    if status >= 500:
        log.warning("%s %s -> %d %s: %s", request.method, request.url.path, status, error_type, message)
    return JSONResponse(error_body(error_type, message), status_code=status, headers=headers)


def install_error_handler(app: FastAPI) -> None:
    for cls in (KnowpatchError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, handle_error)
