"""The worker's internal HTTP contract, written once: workers/server.py serves these routes with
these bodies, api/backend_http.py calls them with the same models, and both enforce the limits the
public API enforces (a caller that reaches the internal port directly gets nothing more).

Replies are the dataclasses of service.inference, validated on arrival with pydantic. Errors are
service.errors bodies ({"error": {"type", "message"}}) with the class's status. Every /internal
route needs `Authorization: Bearer <internal token>` (service.config.internal_token).
"""
from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.errors import KnowpatchError
from service.inference import ExportStream, GenerateParams, GenerateResult

# Limits of a generation or score request, on the public and the internal routes alike.
MAX_INPUT_CHARS = 8000
DEFAULT_MAX_NEW_TOKENS = 32
MAX_STOP_SEQUENCES = 8
MAX_CANDIDATES = 32
MAX_CANDIDATE_CHARS = MAX_INPUT_CHARS  # a candidate may be a passage; the model's context is the real bound
MAX_MESSAGES = 256

GENERATE = "/internal/generate"
GENERATE_STREAM = "/internal/generate_stream"
SCORE = "/internal/score"
CHAT_PROMPT = "/internal/chat_prompt"
INFO = "/internal/info"
EXPORT = "/internal/export"  # GET ?format=merged|peft&rank=N: a tar stream, as GET /admin/export answers
MODEL_VERSION_HEADER = "X-Model-Version"

T = TypeVar("T")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateCall(_Body):
    """GenerateParams on the wire. max_new_tokens is checked against the worker's own
    KNOWPATCH_MAX_NEW_TOKENS_LIMIT by the server (a setting, not a constant)."""

    inputs: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    do_sample: bool = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    min_model_version: int | None = None

    @classmethod
    def of(cls, params: GenerateParams) -> GenerateCall:
        """Unvalidated: the receiving side checks, so both deployments refuse with the same message."""
        return cls.model_construct(**params.to_dict())

    def params(self) -> GenerateParams:
        return GenerateParams.from_dict(self.model_dump())


class ScoreCall(_Body):
    # No lower bounds: the backend refuses an empty prompt or list in its own words, on both deployments.
    prompt: str = Field(max_length=MAX_INPUT_CHARS)
    candidates: list[str] = Field(max_length=MAX_CANDIDATES)
    min_model_version: int | None = None


class ChatMessage(_Body):
    role: str = Field(min_length=1, max_length=64)
    content: str = Field(max_length=MAX_INPUT_CHARS)


class ChatPromptCall(_Body):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class ChatPromptReply(_Body):
    prompt: str


class StreamChunk(BaseModel):
    """One `data:` line of /internal/generate_stream: a token's text, the final result, or an error
    raised after the stream started (the status line was already sent)."""

    text: str = ""
    result: GenerateResult | None = None
    error: dict[str, Any] | None = None


class ReadyReply(_Body):
    ready: bool
    message: str


class HealthReply(_Body):
    status: Literal["ok"] = "ok"


def decode(kind: type[T], data: Any, where: str) -> T:
    """`data` (parsed JSON) as `kind`, or a KnowpatchError saying what the reply lacked."""
    try:
        return TypeAdapter(kind).validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
        raise KnowpatchError(f"{where} sent a malformed {getattr(kind, '__name__', kind)}: {problems}") from None


class TarResponse(StreamingResponse):
    """An export's tar stream, as the worker and the public API both answer it. The stream is closed
    (its temporary folder deleted, or its connection to the worker released) however the response
    ends: when the client goes away, Starlette stops iterating and leaves the iterator unclosed."""

    def __init__(self, stream: ExportStream) -> None:
        headers = {"Content-Disposition": f'attachment; filename="{stream.folder}.tar"',
                   MODEL_VERSION_HEADER: str(stream.model_version)}
        if stream.size is not None:
            headers["Content-Length"] = str(stream.size)
        super().__init__(stream.chunks, media_type="application/x-tar", headers=headers)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.close()
