"""InferenceBackend over HTTP: the API's client of the worker's internal server (split deployment).

Wire format (the worker's /internal routes): generate and generate_stream take GenerateParams as
JSON; the stream sends `data: {"text": ...}` per token and `data: {"result": {...}}` last; errors
come back as {"error": {"type", "message"}} and are raised here as the same service.errors class.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import fields
from typing import Any, TypeVar

import httpx

from service.errors import KnowpatchError, Unavailable, error_from_reply
from service.inference import BackendInfo, CandidateScore, GenerateParams, GenerateResult, ScoreResult, StreamEvent

T = TypeVar("T")


def _build(cls: type[T], data: Any, where: str) -> T:
    """A dataclass from the worker's JSON, or a KnowpatchError saying what the reply lacked."""
    try:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})  # type: ignore[arg-type]
    except (KeyError, TypeError) as exc:  # a required field missing, or not a JSON object
        raise KnowpatchError(f"{where} sent a malformed {cls.__name__}: {exc!r}") from None


class HttpBackend:
    """The worker as an InferenceBackend. `timeout` bounds each call, so it must exceed
    settings.version_wait_s plus the longest generation."""

    def __init__(self, base_url: str, timeout: float, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    @contextmanager
    def _transport_errors(self, path: str) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise Unavailable(f"worker at {self.base_url} did not answer {path} within {self.timeout:g} s "
                              f"({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"worker at {self.base_url} is not reachable: {type(exc).__name__}: {exc}") from exc

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._transport_errors(path):
            reply = await self._client.request(method, path, json=body)
        where = f"worker at {self.base_url}{path}"
        if reply.status_code >= 400:
            raise error_from_reply(reply.status_code, reply.content, where)
        try:
            return reply.json()
        except ValueError:
            raise KnowpatchError(f"{where} sent a reply that is not JSON") from None

    async def generate(self, params: GenerateParams) -> GenerateResult:
        data = await self._call("POST", "/internal/generate", params.to_dict())
        return _build(GenerateResult, data, f"worker at {self.base_url}")

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]:
        path, where = "/internal/generate_stream", f"worker at {self.base_url}"
        with self._transport_errors(path):
            async with self._client.stream("POST", path, json=params.to_dict()) as reply:
                if reply.status_code >= 400:
                    raise error_from_reply(reply.status_code, await reply.aread(), f"{where}{path}")
                async for line in reply.aiter_lines():
                    event = self._stream_event(line, where)
                    if event is not None:
                        yield event
                        if event.result is not None:
                            return
        raise Unavailable(f"{where} ended the generation stream before its final result")

    @staticmethod
    def _stream_event(line: str, where: str) -> StreamEvent | None:
        if not line.startswith("data:"):
            return None  # blank separators, comments, event names
        try:
            data = json.loads(line[5:].strip())
        except ValueError:
            raise KnowpatchError(f"{where} sent a stream line that is not JSON: {line[:200]!r}") from None
        if not isinstance(data, dict):
            raise KnowpatchError(f"{where} sent a stream event that is not a JSON object: {line[:200]!r}")
        if "error" in data:
            raise error_from_reply(500, json.dumps(data).encode(), where)
        if "result" in data:
            return StreamEvent(text="", result=_build(GenerateResult, data["result"], where))
        return StreamEvent(text=str(data.get("text", "")))

    async def score(self, prompt: str, candidates: list[str], min_model_version: int | None = None) -> ScoreResult:
        body = {"prompt": prompt, "candidates": candidates, "min_model_version": min_model_version}
        data = await self._call("POST", "/internal/score", body)
        where = f"worker at {self.base_url}"
        try:
            scores, version = list(data["scores"]), int(data["model_version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KnowpatchError(f"{where} sent a malformed score reply: {exc!r}") from None
        return ScoreResult(scores=[_build(CandidateScore, s, where) for s in scores], model_version=version)

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        data = await self._call("POST", "/internal/chat_prompt", {"messages": messages})
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise KnowpatchError(f"worker at {self.base_url} sent a chat_prompt reply without a 'prompt' string")
        return data["prompt"]

    async def info(self) -> BackendInfo:
        data = await self._call("GET", "/internal/info")
        return _build(BackendInfo, data, f"worker at {self.base_url}")

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """A create_app lifespan hook that closes the connections at shutdown."""
        yield
        await self.aclose()
