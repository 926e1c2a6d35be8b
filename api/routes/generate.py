"""/generate, /generate_stream and /score: inference on the patched model (scope `generate`)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from api import generation
from api.deps import BackendDep, GenerateCaller, MetricsDep, SettingsDep
from api.errors import error_responses
from api.schemas.generation import GenerateIn, GenerateOut, ScoreIn, ScoreOut

router = APIRouter(tags=["generation"])
STREAM_DOC: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"example": (
    'data: {"token": {"text": " Rome"}}\n\n'
    'data: {"generated_text": " Rome", "details": {"finish_reason": "eos", "generated_tokens": 1}, '
    '"model_version": 41}\n\n')}}}}
ERRORS = error_responses(400, 401, 403, 422, 429, 503)


@router.post("/generate", response_model=GenerateOut, responses={**ERRORS, **STREAM_DOC})
async def generate(_: GenerateCaller, body: GenerateIn, response: Response, backend: BackendDep, settings: SettingsDep,
                   metrics: MetricsDep) -> GenerateOut | StreamingResponse:
    """Text generation; with `"stream": true` the same events as /generate_stream."""
    params = generation.tgi_params(body, settings.max_new_tokens_limit)
    if body.stream:
        return await generation.stream(backend, params, generation.TgiFormat(), metrics, "generate_stream")
    result = await generation.generate(backend, params, metrics, "generate")
    response.headers["X-Model-Version"] = str(result.model_version)
    return GenerateOut.of(result)


@router.post("/generate_stream", response_class=StreamingResponse, responses={**ERRORS, **STREAM_DOC})
async def generate_stream(_: GenerateCaller, body: GenerateIn, backend: BackendDep, settings: SettingsDep,
                          metrics: MetricsDep) -> StreamingResponse:
    """Server-sent events: `data: {"token": {"text"}}` per token, then the whole answer with model_version."""
    params = generation.tgi_params(body, settings.max_new_tokens_limit)
    return await generation.stream(backend, params, generation.TgiFormat(), metrics, "generate_stream")


@router.post("/score", response_model=ScoreOut, responses=ERRORS)
async def score(_: GenerateCaller, body: ScoreIn, response: Response, backend: BackendDep) -> ScoreOut:
    """Log-probabilities of candidate continuations: checks an edit without sampling."""
    result = await backend.score(body.prompt, body.candidates, body.min_model_version)
    response.headers["X-Model-Version"] = str(result.model_version)
    return ScoreOut.of(result)
