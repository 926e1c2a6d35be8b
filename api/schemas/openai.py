"""OpenAI-compatible bodies (/v1/completions, /v1/chat/completions, /v1/models), plus model_version.

Unknown OpenAI fields are ignored (clients send many); those that would change the answer and are
not supported are refused with a message (n > 1, an unknown role).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import NonBlank, plain_text
from api.schemas.generation import MAX_INPUT_CHARS, MAX_STOP_SEQUENCES
from service.inference import GenerateResult

MAX_MESSAGES = 128
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's; the route clamps it to the server's limit
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}


class SamplingIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="ignored: the server's model answers (see GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="at most KNOWPATCH_MAX_NEW_TOKENS_LIMIT")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} stop sequences")
    seed: int | None = None
    n: Literal[1] = Field(1, description="only 1 is supported")
    stream: bool = False
    min_model_version: int | None = Field(None, ge=0, description="knowpatch extension: see POST /generate")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"{len(stops)} stop sequences; the limit is {MAX_STOP_SEQUENCES}")
        return [plain_text(stop) for stop in stops]

    def stop_sequences(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionIn(SamplingIn):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "prompt": "The Eiffel Tower is located in the city of", "max_tokens": 8, "temperature": 0}]})

    prompt: NonBlank = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    max_tokens: int | None = Field(None, ge=1, description="at most KNOWPATCH_MAX_NEW_TOKENS_LIMIT; default "
                                                           f"{DEFAULT_COMPLETION_MAX_TOKENS}, or that limit if lower")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_INPUT_CHARS)


class ChatCompletionIn(SamplingIn):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "messages": [{"role": "user", "content": "In which city is the Eiffel Tower?"}], "max_tokens": 16,
        "temperature": 0}]})

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens; wins if both")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: GenerateResult) -> "Usage":
        return cls(prompt_tokens=result.prompt_tokens, completion_tokens=result.generated_tokens,
                   total_tokens=result.prompt_tokens + result.generated_tokens)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str | None


class OpenAIResponse(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage
    model_version: int = Field(description="knowpatch: ledger seq of the model state that answered")


COMPLETION_EXAMPLE: dict[str, Any] = {
    "id": "cmpl-5f2a", "object": "text_completion", "created": 1767607200, "model": "smollm2",
    "choices": [{"index": 0, "text": " Rome.", "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}, "model_version": 41}


class CompletionOut(OpenAIResponse):
    model_config = ConfigDict(json_schema_extra={"examples": [COMPLETION_EXAMPLE]})

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatCompletionOut(OpenAIResponse):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        **COMPLETION_EXAMPLE, "id": "chatcmpl-5f2a", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Rome."}, "finish_reason": "stop"}]}]})

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "knowpatch"


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "object": "list", "data": [{"id": "smollm2", "object": "model", "created": 0, "owned_by": "knowpatch"}]}]})

    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish_reason(result: GenerateResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, result.finish_reason)


def completion_out(result: GenerateResult, model: str) -> CompletionOut:
    choice = CompletionChoice(text=result.generated_text, finish_reason=finish_reason(result))
    return CompletionOut(id=new_id("cmpl"), created=now(), model=model, choices=[choice],
                         usage=Usage.of(result), model_version=result.model_version)


def chat_completion_out(result: GenerateResult, model: str) -> ChatCompletionOut:
    choice = ChatChoice(message=ChatChoiceMessage(content=result.generated_text), finish_reason=finish_reason(result))
    return ChatCompletionOut(id=new_id("chatcmpl"), created=now(), model=model, choices=[choice],
                             usage=Usage.of(result), model_version=result.model_version)


def chunk(chunk_id: str, created: int, model: str, chat: bool, delta: dict[str, Any] | str,
          finish: str | None = None) -> dict[str, Any]:
    """One streamed chunk: chat.completion.chunk (delta) or text_completion (text)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = delta
    else:
        choice.update(text=delta, logprobs=None)
    return {"id": chunk_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice]}
