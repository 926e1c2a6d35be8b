"""The inference backend of a process that listens before its model is loaded.

`StartingBackend` stands in for the real backend from the first request on: until `ready(backend)`
is called it answers `info()` with ready=False and the start's progress (which /ready reports), and
every model call with Unavailable (503). Afterwards it passes every call through. `knowpatch serve`
puts it behind the API, `knowpatch worker` behind its internal server.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from service.errors import Unavailable
from service.inference import (BackendInfo, ExportFormat, ExportStream, GenerateParams, GenerateResult,
                               InferenceBackend, ScoreResult, StreamEvent)
from service.progress import Progress


class StartingBackend:
    def __init__(self, model: str, progress: Progress) -> None:
        self.model = model
        self.progress = progress
        self.backend: InferenceBackend | None = None
        self.failed: str | None = None  # why the start failed, once it has

    def ready(self, backend: InferenceBackend) -> None:
        self.backend = backend

    def fail(self, reason: str) -> None:
        self.failed = reason

    def _not_ready(self) -> str:
        if self.failed is not None:
            return f"the start failed: {self.failed}"
        return f"starting: {self.progress.describe()}"

    def not_ready(self) -> str | None:
        """Why this process is not ready (the worker's /ready): the start's phase, or the loaded
        backend's own reason (its edit loop stopped, stuck or retrying)."""
        if self.backend is None:
            return self._not_ready()
        check = getattr(self.backend, "not_ready", None)
        return check() if check is not None else None

    def _backend(self) -> InferenceBackend:
        if self.backend is None:
            raise Unavailable(f"the model is not ready yet ({self._not_ready()}); retry later")
        return self.backend

    async def generate(self, params: GenerateParams) -> GenerateResult:
        return await self._backend().generate(params)

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]:
        async for event in self._backend().generate_stream(params):
            yield event

    async def score(self, prompt: str, candidates: list[str], min_model_version: int | None = None) -> ScoreResult:
        return await self._backend().score(prompt, candidates, min_model_version)

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return await self._backend().chat_prompt(messages)

    async def export(self, export_format: ExportFormat, rank: int | None = None) -> ExportStream:
        return await self._backend().export(export_format, rank)

    async def info(self) -> BackendInfo:
        if self.backend is not None:
            return await self.backend.info()
        return BackendInfo(self.model, 0, False, {"not_ready": self._not_ready(), "progress": self.progress.snapshot()})
