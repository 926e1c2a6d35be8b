"""The in-process inference backend: generation and scoring on the editor's resident model."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

from service.engine.editor import Editor
from service.engine.scoring import continuation_row
from service.errors import InvalidRequest, Unavailable
from service.inference import (
    BackendInfo, CandidateScore, GenerateParams, GenerateResult, ScoreResult, StreamEvent,
)
from workers.generation import generate_steps, position_limit

_DONE = object()


class LocalBackend:
    """Implements service.inference.InferenceBackend on an Editor held by this process.

    `not_ready`: why the backend cannot serve edited answers now (the worker's Worker.not_ready:
    replaying, its loop stopped, stuck or retrying after an error), None when it can."""

    def __init__(self, editor: Editor, *, version_wait_s: float = 30.0,
                 not_ready: Callable[[], str | None] = lambda: None) -> None:
        self.editor = editor
        self.version_wait_s = version_wait_s
        self.not_ready = not_ready

    async def _wait_for(self, version: int | None) -> None:
        if version is None or self.editor.version >= version:
            return
        deadline = time.monotonic() + self.version_wait_s
        while self.editor.version < version:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"model version {version} is not live after {self.version_wait_s:g} s "
                    f"(current version {self.editor.version}); the edit may still be queued or may have failed"
                )
            await asyncio.sleep(0.05)

    def _run(self, params: GenerateParams) -> GenerateResult:
        with self.editor.reading() as version:
            text, reason, count = "", "length", 0
            for step in generate_steps(self.editor.model, self.editor.tokenizer, params):
                text, reason, count = text + step.text, step.finish_reason or reason, step.tokens
            prompt_tokens = len(self.editor.tokenizer(params.inputs)["input_ids"])
        return GenerateResult(text, reason, count, prompt_tokens, version)

    async def generate(self, params: GenerateParams) -> GenerateResult:
        await self._wait_for(params.min_model_version)
        return await asyncio.to_thread(self._run, params)

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]:
        await self._wait_for(params.min_model_version)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                with self.editor.reading() as version:
                    text, reason, count = "", "length", 0
                    for step in generate_steps(self.editor.model, self.editor.tokenizer, params):
                        if cancelled.is_set():
                            return
                        text, reason, count = text + step.text, step.finish_reason or reason, step.tokens
                        loop.call_soon_threadsafe(queue.put_nowait, StreamEvent(step.text))
                    prompt_tokens = len(self.editor.tokenizer(params.inputs)["input_ids"])
                result = GenerateResult(text, reason, count, prompt_tokens, version)
                loop.call_soon_threadsafe(queue.put_nowait, StreamEvent("", result))
            except Exception as exc:  # handed to the consumer, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = loop.run_in_executor(None, produce)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancelled.set()
            await worker

    def _check_score_rows(self, prompt: str, candidates: list[str]) -> None:
        """InvalidRequest for a candidate that tokenises to nothing or a row past the model's positions."""
        limit = position_limit(self.editor.model)
        for candidate in candidates:
            try:
                row = continuation_row(self.editor.tokenizer, prompt, candidate)
            except ValueError as exc:  # the candidate tokenises to nothing after the prompt
                raise InvalidRequest(str(exc)) from None
            if limit and len(row.ids) > limit:
                raise InvalidRequest(f"prompt + candidate {candidate[:50]!r} ({len(row.ids)} tokens) exceeds the "
                                     f"model's {limit} positions")

    def _score(self, prompt: str, candidates: list[str]) -> ScoreResult:
        self._check_score_rows(prompt, candidates)
        with self.editor.reading() as version:
            scores = self.editor.score(prompt, candidates)
        return ScoreResult(
            [CandidateScore(c, s.total_logprob, s.mean_logprob, s.tokens) for c, s in zip(candidates, scores)],
            version,
        )

    async def score(self, prompt: str, candidates: list[str], min_model_version: int | None = None) -> ScoreResult:
        if not prompt or not candidates:
            raise InvalidRequest("score needs a prompt and at least one candidate")
        await self._wait_for(min_model_version)
        return await asyncio.to_thread(self._score, prompt, candidates)

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        tokenizer = self.editor.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _info(self) -> BackendInfo:
        with self.editor.reading() as version:
            details = self.editor.info() | {
                "fingerprint": self.editor.loaded.fingerprint,
                "device": str(self.editor.adapter.head.weight.device),
                "dtype": str(self.editor.adapter.head.weight.dtype).removeprefix("torch."),
                "weights_digest": self.editor.served_digest(),  # sha256 of the edited weights as served
            }
        reason = self.not_ready()
        if reason is not None:
            details["not_ready"] = reason  # /ready reports it (over HTTP too: details travel whole)
        return BackendInfo(self.editor.loaded.name, version, reason is None, details)

    async def info(self) -> BackendInfo:
        return await asyncio.to_thread(self._info)
