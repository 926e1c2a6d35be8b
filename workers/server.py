"""The worker's internal HTTP server: the API of the split deployment forwards inference here."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.errors import InvalidRequest, KnowpatchError, NotFound
from service.inference import GenerateParams
from workers.inference import LocalBackend

log = logging.getLogger(__name__)


def _error(exc: KnowpatchError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _params(request: Request) -> GenerateParams:
    try:
        return GenerateParams.from_dict(await request.json())
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"bad generation parameters: {exc}") from exc


def create_worker_app(backend: LocalBackend) -> FastAPI:
    app = FastAPI(title="knowpatch worker (internal)", docs_url=None, redoc_url=None)
    app.add_exception_handler(KnowpatchError, lambda request, exc: _error(exc))

    @app.post("/internal/generate")
    async def generate(request: Request) -> dict:
        return asdict(await backend.generate(await _params(request)))

    @app.post("/internal/generate_stream")
    async def generate_stream(request: Request) -> StreamingResponse:
        params = await _params(request)
        stream = backend.generate_stream(params)
        first = await anext(stream)  # errors before the first token become a proper status code

        async def events() -> AsyncIterator[str]:
            event = first
            try:
                while True:
                    payload = {"result": asdict(event.result)} if event.result else {"text": event.text}
                    yield f"data: {json.dumps(payload)}\n\n"
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

    @app.post("/internal/score")
    async def score(request: Request) -> dict:
        body = await request.json()
        result = await backend.score(body.get("prompt", ""), list(body.get("candidates") or []), body.get("min_model_version"))
        return asdict(result)

    @app.post("/internal/chat_prompt")
    async def chat_prompt(request: Request) -> dict:
        return {"prompt": await backend.chat_prompt((await request.json()).get("messages") or [])}

    @app.get("/internal/info")
    async def info() -> dict:
        return asdict(await backend.info())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """503 with the reason while the worker replays, or its loop has stopped, is stuck or is retrying."""
        reason = backend.not_ready()
        return JSONResponse({"ready": reason is None, "message": reason or "ready"}, status_code=503 if reason else 200)

    @app.api_route("/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def unknown(path: str) -> JSONResponse:
        return _error(NotFound(f"no internal route /{path}"))

    return app
