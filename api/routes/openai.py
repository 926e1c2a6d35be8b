"""OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models (scope `generate`)."""
from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from api import generation
from api.deps import BackendDep, GenerateCaller, MetricsDep, ModelNameDep, SettingsDep
from api.errors import error_responses
from api.schemas.openai import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionIn,
    ChatCompletionOut,
    CompletionIn,
    CompletionOut,
    ModelCard,
    ModelList,
    SamplingIn,
    chat_completion_out,
    completion_out,
)
from service.inference import GenerateParams

router = APIRouter(prefix="/v1", tags=["openai"])
DEFAULT_CHAT_MAX_TOKENS = 256
STREAM_DOC = {200: {"content": {"text/event-stream": {"example": (
    'data: {"id": "cmpl-5f2a", "object": "text_completion", "choices": [{"index": 0, "text": " Rome"}]}\n\n'
    "data: [DONE]\n\n")}}}, **error_responses(400, 401, 403, 422, 429, 503)}


def _params(body: SamplingIn, prompt: str, max_tokens: int, limit: int) -> GenerateParams:
    return GenerateParams(
        inputs=prompt, max_new_tokens=generation.check_max_tokens(max_tokens, limit, "max_tokens"),
        temperature=body.temperature, top_p=body.top_p, do_sample=body.temperature > 0, seed=body.seed,
        stop=body.stop_sequences(), min_model_version=body.min_model_version)


@router.post("/completions", response_model=CompletionOut, responses=STREAM_DOC)
async def completions(_: GenerateCaller, body: CompletionIn, response: Response, backend: BackendDep,
                      settings: SettingsDep, metrics: MetricsDep,
                      model: ModelNameDep) -> CompletionOut | StreamingResponse:
    limit = settings.max_new_tokens_limit
    params = _params(body, body.prompt, body.max_tokens or min(DEFAULT_COMPLETION_MAX_TOKENS, limit), limit)
    if body.stream:
        fmt = generation.OpenAIFormat(model=model, chat=False)
        return await generation.stream(backend, params, fmt, metrics, "v1_completions")
    result = await generation.generate(backend, params, metrics, "v1_completions")
    response.headers["X-Model-Version"] = str(result.model_version)
    return completion_out(result, model)


@router.post("/chat/completions", response_model=ChatCompletionOut, responses=STREAM_DOC)
async def chat_completions(_: GenerateCaller, body: ChatCompletionIn, response: Response, backend: BackendDep,
                           settings: SettingsDep, metrics: MetricsDep,
                           model: ModelNameDep) -> ChatCompletionOut | StreamingResponse:
    limit = settings.max_new_tokens_limit
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_CHAT_MAX_TOKENS, limit)
    generation.check_max_tokens(max_tokens, limit, "max_tokens")  # before asking the backend anything
    prompt = await backend.chat_prompt([m.model_dump() for m in body.messages])
    params = _params(body, prompt, max_tokens, limit)
    if body.stream:
        fmt = generation.OpenAIFormat(model=model, chat=True)
        return await generation.stream(backend, params, fmt, metrics, "v1_chat_completions")
    result = await generation.generate(backend, params, metrics, "v1_chat_completions")
    response.headers["X-Model-Version"] = str(result.model_version)
    return chat_completion_out(result, model)


@router.get("/models", response_model=ModelList, responses=error_responses(401, 403, 503))
async def models(_: GenerateCaller, model: ModelNameDep) -> ModelList:
    return ModelList(data=[ModelCard(id=model)])
