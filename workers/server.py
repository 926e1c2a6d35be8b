"""The worker's internal HTTP server: the API of the split deployment forwards inference here.

The routes and bodies are service.wire's, shared with the client (api/backend_http.py). Every
/internal route needs the internal token; /health and /ready answer anyone (orchestrators probe them).
"""
from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from service import wire
from service.errors import InvalidRequest, KnowpatchError, NotFound, Unauthorized
from service.inference import BackendInfo, ExportFormat, GenerateResult, InferenceBackend, ScoreResult

log = logging.getLogger(__name__)


class WorkerBackend(InferenceBackend, Protocol):
    """What the internal server serves: a LocalBackend, or the StartingBackend in front of one."""

    def not_ready(self) -> str | None: ...


def _error(exc: KnowpatchError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _invalid(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = "; ".join(f"{'.'.join(map(str, e.get('loc', ())[1:])) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return _error(InvalidRequest(f"invalid internal request: {detail or exc}"))


def create_worker_app(backend: WorkerBackend, *, token: str, max_new_tokens_limit: int) -> FastAPI:
    app = FastAPI(title="knowpatch worker (internal)", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(KnowpatchError, lambda request, exc: _error(exc))  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)
    expected = f"Bearer {token}".encode()

    def authorised(authorization: Annotated[str | None, Header()] = None) -> None:
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected):
            raise Unauthorized("the worker's internal routes need the internal token (KNOWPATCH_INTERNAL_TOKEN)")

    def checked(call: wire.GenerateCall) -> wire.GenerateCall:
        if call.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequest(f"max_new_tokens is {call.max_new_tokens}; this worker allows at most "
                                 f"{max_new_tokens_limit} (KNOWPATCH_MAX_NEW_TOKENS_LIMIT)")
        return call

    internal = [Depends(authorised)]

    @app.post(wire.GENERATE, dependencies=internal)
    async def generate(call: wire.GenerateCall) -> GenerateResult:
        return await backend.generate(checked(call).params())

    @app.post(wire.GENERATE_STREAM, dependencies=internal)
    async def generate_stream(call: wire.GenerateCall) -> StreamingResponse:
        stream = backend.generate_stream(checked(call).params())
        first = await anext(stream)  # errors before the first token become a proper status code

        async def events() -> AsyncIterator[str]:
            event = first
            try:
                while True:
                    yield f"data: {wire.StreamChunk(text=event.text, result=event.result).model_dump_json()}\n\n"
                    try:
                        event = await anext(stream)
                    except StopAsyncIteration:
                        return
            except Exception as exc:  # the status line is sent: the failure is the stream's last event
                if not isinstance(exc, KnowpatchError):
                    log.error("generation stream failed", exc_info=exc)
                    exc = KnowpatchError("internal error in the worker; its log has the details")
                yield f"data: {json.dumps(exc.body())}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post(wire.SCORE, dependencies=internal)
    async def score(call: wire.ScoreCall) -> ScoreResult:
        return await backend.score(call.prompt, call.candidates, call.min_model_version)

    @app.post(wire.CHAT_PROMPT, dependencies=internal)
    async def chat_prompt(call: wire.ChatPromptCall) -> wire.ChatPromptReply:
        return wire.ChatPromptReply(prompt=await backend.chat_prompt([m.model_dump() for m in call.messages]))

    @app.get(wire.INFO, dependencies=internal)
    async def info() -> BackendInfo:
        return await backend.info()

    @app.get(wire.EXPORT, dependencies=internal)
    async def export(export_format: Annotated[ExportFormat, Query(alias="format")] = "merged",
                     rank: Annotated[int | None, Query()] = None) -> wire.TarResponse:
        """The tar stream, Content-Length and model version headers included; the API passes it on."""
        return wire.TarResponse(await backend.export(export_format, rank))

    @app.get("/health")
    async def health() -> wire.HealthReply:
        return wire.HealthReply()

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """503 with the reason while the worker replays, or its loop has stopped, is stuck or is retrying."""
        reason = backend.not_ready()
        reply = wire.ReadyReply(ready=reason is None, message=reason or "ready")
        return JSONResponse(reply.model_dump(), status_code=503 if reason else 200)

    @app.api_route("/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def unknown(path: str) -> JSONResponse:
        return _error(NotFound(f"no internal route /{path}"))

    return app
