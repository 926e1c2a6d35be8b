"""A model-free backend that 'learns' every edit it is given: for protocol and report tests."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.engine.types import EditRequest
from service.eval.backend import BatchOutcome, Query, QueryScore


class FakeBackend:
    """After an edit, the edited prompt (and any prompt naming its subject) prefers target_new."""

    kind = "fake"

    def __init__(self, fail_batches: Sequence[str] = ()) -> None:
        self.edits: dict[str, str] = {}  # subject -> target_new
        self.fail_batches = set(fail_batches)
        self.applied_batches: list[str] = []

    def apply(self, requests: Sequence[EditRequest], batch_id: str) -> BatchOutcome:
        if batch_id in self.fail_batches:
            return BatchOutcome(len(requests), applied=False, error="refused")
        self.edits.update({r.subject: r.target_new for r in requests})
        self.applied_batches.append(batch_id)
        return BatchOutcome(len(requests), True, None, len(self.applied_batches), {"targets_s": 0.01},
                            [3] * len(requests), [0.04] * len(requests))

    def _learned(self, q: Query) -> bool:
        return any(subject in q.prompt and q.continuation == new for subject, new in self.edits.items())

    def score(self, queries: Sequence[Query]) -> list[QueryScore]:
        out = []
        for q in queries:
            tokens = len(q.continuation.split())
            logprob = -0.1 if self._learned(q) else -2.0  # a tie: nothing beats anything before editing
            out.append(QueryScore(logprob * tokens, tokens, self._learned(q)))
        return out

    def token_accuracy(self, queries: Sequence[Query]) -> list[float | None]:
        return [1.0 if self._learned(q) else 0.0 for q in queries]

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return [" and then the story goes on with more words" for _ in prompts]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "edits": len(self.edits)}

    def close(self) -> None:
        pass
