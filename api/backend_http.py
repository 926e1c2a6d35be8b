"""InferenceBackend over HTTP: the API's client of the worker's internal server (split deployment).

The routes, bodies and replies are service.wire's, the same models the worker serves; errors come
back as service.errors bodies and are raised here as the same class.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx

from service import wire
from service.errors import Forbidden, KnowpatchError, Unauthorized, Unavailable, error_from_reply
from service.inference import (BackendInfo, ExportFormat, ExportStream, GenerateParams, GenerateResult, ScoreResult,
                               StreamEvent)

# The worker writes a whole export before it sends the first byte (a merged 8B model in float32 is
# 32 GB to write), so an export's reads may wait far longer than any inference call.
EXPORT_READ_TIMEOUT_S = 3600.0


class HttpBackend:
    """The worker as an InferenceBackend. `timeout` bounds each call, so it must exceed
    settings.version_wait_s plus the longest generation."""

    def __init__(self, base_url: str, timeout: float, *, token: str,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport,
                                         headers={"Authorization": f"Bearer {token}"})

    @contextmanager
    def _transport_errors(self, path: str) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise Unavailable(f"worker at {self.base_url} did not answer {path} within {self.timeout:g} s "
                              f"({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"worker at {self.base_url} is not reachable: {type(exc).__name__}: {exc}") from exc

    def _refusal(self, status: int, body: bytes, path: str) -> KnowpatchError:
        where = f"worker at {self.base_url}{path}"
        error = error_from_reply(status, body, where)
        if isinstance(error, (Unauthorized, Forbidden)):  # not the caller's key: this deployment's setup
            return Unavailable(f"{where} refused the API's internal token: set the same KNOWPATCH_INTERNAL_TOKEN "
                               f"on the API and the worker ({error.message})")
        return error

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._transport_errors(path):
            reply = await self._client.request(method, path, json=body)
        where = f"worker at {self.base_url}{path}"
        if reply.status_code >= 400:
            raise self._refusal(reply.status_code, reply.content, path)
        try:
            return reply.json()
        except ValueError:
            raise KnowpatchError(f"{where} sent a reply that is not JSON") from None

    async def generate(self, params: GenerateParams) -> GenerateResult:
        data = await self._call("POST", wire.GENERATE, wire.GenerateCall.of(params).model_dump())
        return wire.decode(GenerateResult, data, f"worker at {self.base_url}")

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]:
        path, where = wire.GENERATE_STREAM, f"worker at {self.base_url}"
        with self._transport_errors(path):
            async with self._client.stream("POST", path, json=wire.GenerateCall.of(params).model_dump()) as reply:
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
            chunk = wire.StreamChunk.model_validate_json(line[5:].strip())
        except ValueError:
            raise KnowpatchError(f"{where} sent a malformed stream line: {line[:200]!r}") from None
        if chunk.error is not None:
            raise error_from_reply(500, line[5:].strip(), where)
        return StreamEvent(text=chunk.text, result=chunk.result)

    async def score(self, prompt: str, candidates: list[str], min_model_version: int | None = None) -> ScoreResult:
        call = wire.ScoreCall.model_construct(prompt=prompt, candidates=candidates, min_model_version=min_model_version)
        return wire.decode(ScoreResult, await self._call("POST", wire.SCORE, call.model_dump()),
                           f"worker at {self.base_url}")

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        data = await self._call("POST", wire.CHAT_PROMPT, {"messages": messages})
        return wire.decode(wire.ChatPromptReply, data, f"worker at {self.base_url}").prompt

    async def info(self) -> BackendInfo:
        return wire.decode(BackendInfo, await self._call("GET", wire.INFO), f"worker at {self.base_url}")

    async def export(self, export_format: ExportFormat, rank: int | None = None) -> ExportStream:
        """The worker's tar stream, passed on chunk by chunk as it arrives (never held whole); closing
        the stream closes the connection, and the worker then deletes its temporary folder."""
        params: dict[str, str | int] = {"format": export_format}
        if rank is not None:
            params["rank"] = rank
        request = self._client.build_request("GET", wire.EXPORT, params=params,
                                             timeout=httpx.Timeout(self.timeout, read=EXPORT_READ_TIMEOUT_S))
        with self._transport_errors(wire.EXPORT):
            reply = await self._client.send(request, stream=True)
        try:
            if reply.status_code >= 400:
                raise self._refusal(reply.status_code, await reply.aread(), wire.EXPORT)
            return self._export_stream(reply, export_format)
        except BaseException:
            await reply.aclose()
            raise

    def _export_stream(self, reply: httpx.Response, export_format: ExportFormat) -> ExportStream:
        try:
            version = int(reply.headers[wire.MODEL_VERSION_HEADER])
        except (KeyError, ValueError):
            raise KnowpatchError(f"worker at {self.base_url}{wire.EXPORT} sent an export without its model version "
                                 f"(header {wire.MODEL_VERSION_HEADER})") from None
        size = reply.headers.get("Content-Length")
        return ExportStream(version, export_format, reply.aiter_bytes(), reply.aclose, int(size) if size else None)

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """A create_app lifespan hook that closes the connections at shutdown."""
        yield
        await self.aclose()
