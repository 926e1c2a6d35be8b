"""What the API needs from whoever holds the model: generation, scoring, readiness.

Plain data and a Protocol only (no torch): the API depends on this interface, the worker
implements it in-process (embedded deployment) and an HTTP client implements it for the split
deployment.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from service.errors import InvalidRequest

ExportFormat = Literal["merged", "peft"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("merged", "peft")


@dataclass(frozen=True)
class GenerateParams:
    inputs: str
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    do_sample: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_model_version: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerateParams":
        values = dict(data)
        values["stop"] = tuple(values.get("stop") or ())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data


@dataclass(frozen=True)
class GenerateResult:
    generated_text: str
    finish_reason: str  # "length" | "stop" | "eos"
    generated_tokens: int
    prompt_tokens: int
    model_version: int


@dataclass(frozen=True)
class StreamEvent:
    """One generated token (text may be empty for partial UTF-8), or the final event with `result`."""

    text: str
    result: GenerateResult | None = None


@dataclass(frozen=True)
class CandidateScore:
    candidate: str
    total_logprob: float
    mean_logprob: float
    tokens: int


@dataclass(frozen=True)
class ScoreResult:
    scores: list[CandidateScore]
    model_version: int


@dataclass
class BackendInfo:
    model: str
    model_version: int
    ready: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportStream:
    """An export of the served model as a tar stream: the folder `knowpatch export` writes, at
    `model_version`. `close` releases what the stream holds (the model side's temporary folder and its
    export slot, or the connection to the worker); it must be awaited once the stream ends or its reader
    goes away, and may be awaited again."""

    model_version: int
    export_format: ExportFormat
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]
    size: int | None = None  # bytes of the whole tar, when known before it is sent

    @property
    def folder(self) -> str:
        """The tar's one top-level folder, also the download's name: knowpatch-peft-v42."""
        return export_name(self.export_format, self.model_version)


def export_name(export_format: ExportFormat, model_version: int) -> str:
    return f"knowpatch-{export_format}-v{model_version}"


def check_export(export_format: str, rank: int | None) -> None:
    """Refuse an export request that can never succeed (both deployments, before any work)."""
    if export_format not in EXPORT_FORMATS:
        raise InvalidRequest(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}")
    if rank is not None and export_format != "peft":
        raise InvalidRequest("rank applies to format=peft only (it truncates the adapter by SVD)")
    if rank is not None and rank < 1:
        raise InvalidRequest(f"rank must be at least 1, got {rank}")


class InferenceBackend(Protocol):
    async def generate(self, params: GenerateParams) -> GenerateResult: ...

    def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]: ...

    async def score(self, prompt: str, candidates: list[str], min_model_version: int | None = None) -> ScoreResult: ...

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied to OpenAI-style messages, ready for generation."""
        ...

    async def info(self) -> BackendInfo: ...

    async def export(self, export_format: ExportFormat, rank: int | None = None) -> ExportStream:
        """The served model exported at its current version, ready to stream. Unavailable while the
        model is not ready, Overloaded while another export runs, InvalidRequest for a bad request."""
        ...
