"""Stand-ins for the model: a FakeBackend (InferenceBackend in process) and a fake worker app that
serves it over the worker's internal HTTP wire format (for api.backend_http.HttpBackend)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.errors import InvalidRequest, KnowpatchError, Unavailable
from service.inference import BackendInfo, CandidateScore, GenerateParams, GenerateResult, ScoreResult, StreamEvent

ANSWER = [" Rome", ",", " Italy"]


class FakeBackend:
    """Answers ' Rome, Italy' at a fixed model version; refuses min_model_version above it."""

    def __init__(self, model_version: int = 7, ready: bool = True) -> None:
        self.model_version, self.ready = model_version, ready
        self.calls: list[GenerateParams] = []

    def _check(self, min_model_version: int | None) -> None:
        if min_model_version is not None and min_model_version > self.model_version:
            raise Unavailable(f"model version {min_model_version} is not live after waiting; it is at "
                              f"{self.model_version}")

    def _result(self, params: GenerateParams) -> GenerateResult:
        tokens = ANSWER[:params.max_new_tokens]
        finish = "eos" if len(tokens) == len(ANSWER) else "length"
        return GenerateResult("".join(tokens), finish, len(tokens), len(params.inputs.split()), self.model_version)

    async def generate(self, params: GenerateParams) -> GenerateResult:
        self._check(params.min_model_version)
        if params.inputs == "explode":
            raise InvalidRequest("the backend refuses 'explode'")
        if params.inputs == "crash":
            raise RuntimeError("a bug in the backend")
        self.calls.append(params)
        return self._result(params)

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]:
        self._check(params.min_model_version)
        self.calls.append(params)
        result = self._result(params)
        for i in range(result.generated_tokens):
            yield StreamEvent(text=ANSWER[i])
        yield StreamEvent(text="", result=result)

    async def score(self, prompt: str, candidates: list[str], min_model_version: int | None = None) -> ScoreResult:
        self._check(min_model_version)
        scores = [CandidateScore(c, -0.5 if c.strip() == "Rome" else -4.0 * len(c), -0.5, 1) for c in candidates]
        return ScoreResult(scores=scores, model_version=self.model_version)

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    async def info(self) -> BackendInfo:
        return BackendInfo(model="fake-lm", model_version=self.model_version, ready=self.ready,
                           details={"method": "alphaedit", "layers": [4, 5, 6]})


def worker_app(backend: FakeBackend) -> FastAPI:
    """The worker's /internal routes over `backend`, with its error format."""
    app = FastAPI()

    @app.exception_handler(KnowpatchError)
    async def _error(request: Request, exc: KnowpatchError) -> JSONResponse:
        status = 503 if isinstance(exc, Unavailable) else 422
        return JSONResponse({"error": {"type": type(exc).__name__, "message": exc.message}}, status_code=status)

    @app.post("/internal/generate")
    async def generate(body: dict[str, Any]) -> dict[str, Any]:
        return asdict(await backend.generate(GenerateParams.from_dict(body)))

    @app.post("/internal/generate_stream")
    async def generate_stream(body: dict[str, Any]) -> StreamingResponse:
        events = backend.generate_stream(GenerateParams.from_dict(body))
        first = await anext(events)  # errors before the stream starts are plain error replies

        async def lines() -> AsyncIterator[str]:
            event: StreamEvent | None = first
            while event is not None:
                payload = {"result": asdict(event.result)} if event.result else {"text": event.text}
                yield f"data: {json.dumps(payload)}\n\n"
                event = await anext(events, None)

        return StreamingResponse(lines(), media_type="text/event-stream")

    @app.post("/internal/score")
    async def score(body: dict[str, Any]) -> dict[str, Any]:
        return asdict(await backend.score(body["prompt"], body["candidates"], body.get("min_model_version")))

    @app.post("/internal/chat_prompt")
    async def chat_prompt(body: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": await backend.chat_prompt(body["messages"])}

    @app.get("/internal/info")
    async def info() -> dict[str, Any]:
        return asdict(await backend.info())

    return app
