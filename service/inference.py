"""What the API needs from whoever holds the model: generation, scoring, readiness.

Plain data and a Protocol only (no torch): the API depends on this interface, the worker
implements it in-process (embedded deployment) and an HTTP client implements it for the split
deployment.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


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


class InferenceBackend(Protocol):
    async def generate(self, params: GenerateParams) -> GenerateResult: ...

    def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]: ...

    async def score(self, prompt: str, candidates: list[str], min_model_version: int | None = None) -> ScoreResult: ...

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied to OpenAI-style messages, ready for generation."""
        ...

    async def info(self) -> BackendInfo: ...
