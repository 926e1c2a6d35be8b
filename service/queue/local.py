"""In-process queue of the embedded single-process deployment (no Redis)."""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable

from service.errors import Unavailable
from service.queue.base import Message


class LocalQueue:
    """Thread-safe FIFO with the same delivery semantics as RedisStreamQueue (one consumer).

    Nothing survives the process; on start-up the service re-publishes the ledger's unfinished
    operations with ensure().
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[str, int] = {}  # id -> seq, in publish order (dicts keep insertion order)
        self._delivered: set[str] = set()
        self._ids = itertools.count(1)
        self._closed = False

    def publish(self, seq: int) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable("the in-process queue is closed (the service is shutting down)")
            self._entries[str(next(self._ids))] = int(seq)
            self._cond.notify_all()

    def _undelivered(self) -> list[str]:
        return [i for i in self._entries if i not in self._delivered]

    def receive(self, timeout_s: float, max_messages: int = 100) -> list[Message]:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            unacked = [i for i in self._entries if i in self._delivered]
            if unacked:  # a previous receive was not acknowledged (the worker failed): redeliver
                return [Message(i, self._entries[i]) for i in unacked[:max_messages]]
            while not self._closed and not self._undelivered():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            ids = self._undelivered()[:max_messages]
            self._delivered.update(ids)
            return [Message(i, self._entries[i]) for i in ids]

    def ack(self, messages: Iterable[Message]) -> None:
        with self._cond:
            for m in messages:
                self._entries.pop(m.id, None)
                self._delivered.discard(m.id)

    def pending_seqs(self) -> set[int]:
        with self._cond:
            return set(self._entries.values())

    def depth(self) -> int:
        with self._cond:
            return len(self._entries)

    def ensure(self, seqs: Iterable[int]) -> int:
        with self._cond:
            missing = sorted(set(map(int, seqs)) - set(self._entries.values()))
            for seq in missing:
                self._entries[str(next(self._ids))] = seq
            if missing:
                self._cond.notify_all()
            return len(missing)

    def ping(self) -> None:
        if self._closed:
            raise Unavailable("the in-process queue is closed (the service is shutting down)")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
