"""How a weight swap and the readers that hold the model across many steps meet.

The batched decoder (workers/batching.py) holds the editor's read lock for as long as sequences
of one model version are in flight. A swap announces itself here before it waits for the write
lock; the decoder sees it, stops admitting sequences, lets the old version's sequences finish (up
to a bound of its own) and lets go of the lock. The gate also records how long each swap waited.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WAIT_HISTORY = 1000  # most recent swaps the wait summary covers


class SwapWait:
    """One swap waiting for the write lock; `granted()` once it holds it."""

    def __init__(self, gate: "SwapGate") -> None:
        self.gate = gate
        self.started = time.monotonic()

    def granted(self) -> None:
        self.gate.record(time.monotonic() - self.started)


class SwapGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[SwapWait] = []
        self._clear = threading.Event()
        self._clear.set()
        self._waits: deque[float] = deque(maxlen=WAIT_HISTORY)

    @contextmanager
    def waiting(self) -> Iterator[SwapWait]:
        """Announce a swap for the duration of the block (the swap's wait for the write lock and
        the swap itself)."""
        wait = SwapWait(self)
        with self._lock:
            self._waiting.append(wait)
            self._clear.clear()
        try:
            yield wait
        finally:
            with self._lock:
                self._waiting.remove(wait)
                if not self._waiting:
                    self._clear.set()

    def waited(self) -> float | None:
        """Seconds the oldest announced swap has waited so far; None when no swap waits."""
        with self._lock:
            return time.monotonic() - self._waiting[0].started if self._waiting else None

    def wait_clear(self, timeout: float | None = None) -> bool:
        """Block until no swap is announced (True), or `timeout` seconds pass (False)."""
        return self._clear.wait(timeout)

    def record(self, seconds: float) -> None:
        with self._lock:
            self._waits.append(seconds)

    def summary(self) -> dict[str, Any]:
        """Swaps recorded (of the last WAIT_HISTORY) and their wait for the write lock: p50, max, last."""
        with self._lock:
            waits = list(self._waits)
        if not waits:
            return {"swaps": 0, "p50_s": None, "max_s": None, "last_s": None}
        return {"swaps": len(waits), "p50_s": round(statistics.median(waits), 4), "max_s": round(max(waits), 4),
                "last_s": round(waits[-1], 4)}
