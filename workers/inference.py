"""The in-process inference backend: generation and scoring on the editor's resident model, every
request decoded by the continuous-batching loop (workers/batching.py)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path

from service.engine.editor import Editor
from service.engine.prompts import Row
from service.engine.scoring import continuation_row
from service.errors import InvalidRequest, KnowpatchError, Unavailable
from service.export import Sessions
from service.inference import (BackendInfo, ExportFormat, ExportStream, GenerateParams, GenerateResult, ScoreResult,
                               StreamEvent)
from workers.batching import Batcher, BatchLimits
from workers.export import Exports
from workers.generation import position_limit, prompt_ids
from workers.jobs import AsyncSink, GenerationJob, Job, ScoreJob


class LocalBackend:
    """Implements service.inference.InferenceBackend on an Editor held by this process.

    `not_ready`: why the backend cannot serve edited answers now (the worker's Worker.not_ready:
    replaying, its loop stopped, stuck or retrying after an error), None when it can.
    `limits`: the decoder's bounds; default: read from the environment (BatchLimits).
    `ledger`: the ledger the worker writes, read by exports (none: exports answer Unavailable);
    `export_dir`: where exports are written before they are streamed (default: the system's TMPDIR)."""

    def __init__(self, editor: Editor, *, version_wait_s: float = 30.0,
                 not_ready: Callable[[], str | None] = lambda: None, limits: BatchLimits | None = None,
                 ledger: Sessions | None = None, export_dir: Path | None = None) -> None:
        self.editor = editor
        self.version_wait_s = version_wait_s
        self.not_ready = not_ready
        self.limits = limits or BatchLimits()
        self.batcher = Batcher(editor, self.limits)
        self.exports = Exports(editor, ledger, lambda: self.not_ready(), export_dir)

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

    async def _submit(self, params: GenerateParams, streaming: bool) -> GenerationJob:
        await self._wait_for(params.min_model_version)
        ids = prompt_ids(self.editor.model, self.editor.tokenizer, params)
        job = GenerationJob(AsyncSink(), params, ids, self.editor.tokenizer, streaming)
        self.batcher.submit(job)
        return job

    async def _events(self, job: Job) -> AsyncGenerator[StreamEvent | ScoreResult, None]:
        """The job's events until its last; leaving early (the client went away) cancels it."""
        try:
            while True:
                item = await job.sink.get()
                if isinstance(item, KnowpatchError):
                    raise item
                yield item
                if not isinstance(item, StreamEvent) or item.result is not None:
                    return
        finally:
            self.batcher.cancel(job)

    async def generate(self, params: GenerateParams) -> GenerateResult:
        job = await self._submit(params, streaming=False)
        async with aclosing(self._events(job)) as events:
            async for event in events:
                if isinstance(event, StreamEvent) and event.result is not None:
                    return event.result
        raise Unavailable("the decoder ended the generation without a result")

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]:
        job = await self._submit(params, streaming=True)
        async with aclosing(self._events(job)) as events:
            async for event in events:
                if isinstance(event, StreamEvent):
                    yield event

    def _score_rows(self, prompt: str, candidates: list[str]) -> list[Row]:
        """The teacher-forced rows; InvalidRequest for a candidate that tokenises to nothing or a row
        past the model's positions."""
        limit = position_limit(self.editor.model)
        rows = []
        for candidate in candidates:
            try:
                row = continuation_row(self.editor.tokenizer, prompt, candidate)
            except ValueError as exc:  # the candidate tokenises to nothing after the prompt
                raise InvalidRequest(str(exc)) from None
            if limit and len(row.ids) > limit:
                raise InvalidRequest(f"prompt + candidate {candidate[:50]!r} ({len(row.ids)} tokens) exceeds the "
                                     f"model's {limit} positions")
            rows.append(row)
        return rows

    async def score(self, prompt: str, candidates: list[str], min_model_version: int | None = None) -> ScoreResult:
        if not prompt or not candidates:
            raise InvalidRequest("score needs a prompt and at least one candidate")
        rows = self._score_rows(prompt, candidates)
        await self._wait_for(min_model_version)
        job = ScoreJob(AsyncSink(), candidates, rows)
        self.batcher.submit(job)
        async with aclosing(self._events(job)) as events:
            async for event in events:
                if isinstance(event, ScoreResult):
                    return event
        raise Unavailable("the decoder ended the scoring without a result")

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
        details["decoder"] = self.batcher.stats()
        # How long weight swaps waited for the sequences of the old version (bounded by bound_s).
        details["swap_wait"] = self.editor.swap_gate.summary() | {"bound_s": self.limits.swap_wait_s}
        reason = self.not_ready()
        if reason is not None:
            details["not_ready"] = reason  # /ready reports it (over HTTP too: details travel whole)
        return BackendInfo(self.editor.loaded.name, version, reason is None, details)

    async def info(self) -> BackendInfo:
        return await asyncio.to_thread(self._info)

    async def export(self, export_format: ExportFormat, rank: int | None = None) -> ExportStream:
        return await self.exports.start(export_format, rank)

    def close(self) -> None:
        """Stop the decoding loop; requests still waiting get Unavailable."""
        self.batcher.close()
