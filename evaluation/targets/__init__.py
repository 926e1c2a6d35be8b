"""What the evaluation needs from a model that is being edited: the `Target` protocol.

Two implement it, each in its own module so neither one's dependencies load for the other:
`engine.EngineTarget` (an in-process editor; torch) and `service.ServiceTarget` (a running
service over its public HTTP API; httpx).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.engine.types import EditRequest


@dataclass(frozen=True)
class Query:
    """Score `continuation` after `prompt` (teacher-forced)."""

    prompt: str
    continuation: str


@dataclass(frozen=True)
class QueryScore:
    total_logprob: float
    tokens: int
    top1: bool | None  # every continuation token is the argmax; None where the target cannot tell

    @property
    def mean_logprob(self) -> float:
        return self.total_logprob / self.tokens


@dataclass
class BatchOutcome:
    """What applying one batch of edits did."""

    size: int
    applied: bool
    error: str | None = None
    model_version: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)  # compute_z steps per request (in-process only)
    target_nll: list[float] = field(default_factory=list)


class Target(Protocol):
    kind: str  # "local" (EngineTarget) | "http" (ServiceTarget); results.json records it as "backend"

    def apply(self, requests: Sequence[EditRequest], batch_id: str) -> BatchOutcome: ...

    def score(self, queries: Sequence[Query]) -> list[QueryScore]: ...

    def token_accuracy(self, queries: Sequence[Query]) -> list[float | None]:
        """Share of continuation tokens that are the teacher-forced argmax (None: not available)."""
        ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations (without the prompt)."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
