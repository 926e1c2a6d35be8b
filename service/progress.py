"""How far a long start has come: the current phase, its done/total, and an ETA from the rate so far.

One object per start, updated by the thread that does the work and read by /ready and the log.
No torch, so the API can report it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("knowpatch.progress")


@dataclass
class Phase:
    name: str
    total: float | None  # None: not known in advance (the phase only reports that it is running)
    unit: str
    started: float  # time.monotonic()
    done: float = 0.0
    first_done: float | None = None  # time.monotonic() of the first advance

    def eta_s(self, now: float, settle_s: float = 0.0) -> float | None:
        """The rest of the phase at the rate so far; None until something is done, without a total, or
        within `settle_s` of the first advance: work that arrives in bursts (the self corpus generates
        ~12k tokens, then the statistics pass takes them 2k at a time within seconds) would otherwise
        be timed by the burst's first slice alone, several times too slow."""
        elapsed = now - self.started
        if self.total is None or self.done <= 0 or elapsed <= 0 or not self.settled(now, settle_s):
            return None
        return max(self.total - self.done, 0.0) * elapsed / self.done

    def settled(self, now: float, settle_s: float) -> bool:
        return self.first_done is not None and now - self.first_done >= settle_s


class Progress:
    """Phases run one after another; `advance` logs a line at most every `log_interval_s` seconds."""

    def __init__(self, log_interval_s: float = 10.0, settle_s: float = 3.0) -> None:
        self.log_interval_s = log_interval_s
        self.settle_s = settle_s  # see Phase.eta_s
        self._lock = threading.Lock()
        self._phase: Phase | None = None
        self._last_log = 0.0
        self.started = time.monotonic()

    def phase(self, name: str, total: float | None = None, unit: str = "") -> None:
        with self._lock:
            self._phase = Phase(name, total, unit, time.monotonic())
            self._last_log = self._phase.started
        log.info("start-up: %s%s", name, f" ({total:g} {unit})" if total is not None else "")

    def advance(self, amount: float = 1.0) -> None:
        now = time.monotonic()
        with self._lock:
            if self._phase is None:
                return
            self._phase.done += amount
            if self._phase.first_done is None:
                self._phase.first_done = now
            # the first line of a phase waits until its ETA is settled, later ones every log_interval_s
            due = now - self._last_log >= self.log_interval_s and self._phase.settled(now, self.settle_s)
            if due:
                self._last_log = now
        if due:
            log.info("start-up: %s", self.describe())

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: {phase, done, total, unit, elapsed_s, eta_s}; {} before the first phase."""
        now = time.monotonic()
        with self._lock:
            phase = self._phase
            if phase is None:
                return {}
            eta = phase.eta_s(now, self.settle_s)
            return {"phase": phase.name, "done": phase.done, "total": phase.total, "unit": phase.unit,
                    "elapsed_s": round(now - phase.started, 1), "eta_s": None if eta is None else round(eta, 1),
                    "start_elapsed_s": round(now - self.started, 1)}

    def describe(self) -> str:
        snap = self.snapshot()
        if not snap:
            return "starting"
        text = f"{snap['phase']}"
        if snap["total"] is not None:
            text += f": {snap['done']:g}/{snap['total']:g} {snap['unit']}".rstrip()
        text += f", {snap['elapsed_s']:g} s in"
        if snap["eta_s"] is not None:
            text += f", about {snap['eta_s']:g} s left"
        return text
