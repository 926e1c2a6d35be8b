"""The queue of the split deployment: a Redis stream read through a consumer group.

Redis carries work, never state (principle 2): a message is only a wake-up with an operation seq.
Messages are removed (XACK + XDEL) once the ledger has recorded them, so the stream holds exactly
the work not yet done, and pending_seqs()/ensure() can compare it with the ledger.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis

from service.errors import Unavailable
from service.queue.base import Message

log = logging.getLogger(__name__)
T = TypeVar("T")

FIELD = "seq"
SOCKET_TIMEOUT_S = 60.0
MAX_BLOCK_S = SOCKET_TIMEOUT_S - 10  # a blocking read must end well before the socket times out


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStreamQueue:
    """OperationQueue on a Redis stream. One instance per consumer; `consumer` must be stable
    across restarts of the same worker, so that it gets its own unacknowledged messages back.
    `client`, if given, must use decode_responses=True.

    Meant for one worker: messages idle longer than claim_idle_ms are taken over from whichever
    consumer holds them, on the assumption that it died."""

    def __init__(self, url: str, stream: str, group: str, consumer: str, *, claim_idle_ms: int = 60_000,
                 client: redis.Redis | None = None) -> None:
        self.url, self.stream, self.group, self.consumer = url, stream, group, consumer
        self.claim_idle_ms = claim_idle_ms
        self._redis = client or redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
        )
        self._group_ready = False
        self._claim_cursor = "0-0"

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(
                f"the Redis queue at {_safe_url(self.url)} is unreachable ({exc}); check that Redis is running "
                "and KNOWPATCH_REDIS_URL points at it"
            ) from exc

    def _create_group(self) -> None:
        try:
            # id '0': messages published before the group existed (or after a flush) are delivered too.
            self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _grouped(self, call: Callable[[], T]) -> T:
        """Run a consumer-group command; if Redis lost the group (restart, flush), recreate it and retry."""
        with self._errors():
            if not self._group_ready:
                self._create_group()
            try:
                return call()
            except redis.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                log.warning("consumer group %s of stream %s was missing (Redis flushed?); recreating it",
                            self.group, self.stream)
                self._create_group()
                return call()

    def _parse(self, entries: Iterable[tuple[str, dict[str, str] | None]]) -> list[Message]:
        messages, junk = [], []
        for msg_id, fields in entries:
            try:
                messages.append(Message(msg_id, int((fields or {})[FIELD])))
            except (KeyError, ValueError):
                junk.append(msg_id)  # deleted while pending, or not ours: drop it rather than loop on it
        if junk:
            log.warning("dropping %d unreadable messages from stream %s: %s", len(junk), self.stream, junk)
            self._remove(junk)
        return messages

    def _remove(self, ids: list[str]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.execute()

    @staticmethod
    def _entries(reply: Any) -> list[tuple[str, dict[str, str] | None]]:
        # XREADGROUP reply: [[stream, [(id, fields), ...]]] (RESP2) or {stream: [[...]]} (RESP3)
        if not reply:
            return []
        if isinstance(reply, dict):
            return [e for batch in reply.values() for e in (batch[0] if batch and isinstance(batch[0], list) else batch)]
        return [e for _, batch in reply for e in batch]

    # ------------------------------------------------------------------ OperationQueue

    def publish(self, seq: int) -> None:
        with self._errors():
            self._redis.xadd(self.stream, {FIELD: str(int(seq))})

    def receive(self, timeout_s: float, max_messages: int = 100) -> list[Message]:
        def read() -> list[Message]:
            self._claim_from_dead_consumers(max_messages)
            mine = self._parse(self._entries(
                self._redis.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=max_messages)
            ))
            if mine:
                return mine  # delivered before and never acknowledged: a crash, or a failed attempt
            block_ms = int(min(timeout_s, MAX_BLOCK_S) * 1000)
            reply = self._redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=max_messages,
                                           block=block_ms if block_ms > 0 else None)  # block=0 would wait forever
            return self._parse(self._entries(reply))

        return self._grouped(read)

    def _claim_from_dead_consumers(self, count: int) -> None:
        # Messages idle longer than claim_idle_ms belong to a consumer that died (or hangs); taking them
        # risks at most a duplicate delivery, which the ledger makes harmless.
        reply = self._redis.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                       start_id=self._claim_cursor, count=count, justid=True)
        self._claim_cursor = reply[0] if reply else "0-0"

    def ack(self, messages: Iterable[Message]) -> None:
        ids = [m.id for m in messages]
        if ids:
            with self._errors():
                self._remove(ids)

    def pending_seqs(self) -> set[int]:
        seqs: set[int] = set()
        start = "-"
        with self._errors():
            while True:
                page = self._redis.xrange(self.stream, min=start, max="+", count=1000) or []
                for _, fields in page:
                    try:
                        seqs.add(int((fields or {})[FIELD]))
                    except (KeyError, ValueError):
                        pass
                if len(page) < 1000:
                    return seqs
                start = "(" + str(page[-1][0])  # exclusive range: after the last id seen (ids are str here)

    def depth(self) -> int:
        with self._errors():
            return int(self._redis.xlen(self.stream))

    def ensure(self, seqs: Iterable[int]) -> int:
        missing = sorted(set(map(int, seqs)) - self.pending_seqs())
        if missing:
            with self._errors():
                pipe = self._redis.pipeline(transaction=False)
                for seq in missing:
                    pipe.xadd(self.stream, {FIELD: str(seq)})
                pipe.execute()
            log.info("re-enqueued %d ledger operations missing from stream %s", len(missing), self.stream)
        return len(missing)

    def ping(self) -> None:
        with self._errors():
            self._redis.ping()

    def close(self) -> None:
        self._redis.close()
