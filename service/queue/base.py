"""The work queue's interface. Messages carry only an operation seq: the ledger holds all state
(architecture principle 2), so a lost message is re-published from the ledger and a duplicate one
finds its operation already done."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    id: str  # the queue's own id, needed to acknowledge
    seq: int  # operations.seq in the ledger


@runtime_checkable
class OperationQueue(Protocol):
    def publish(self, seq: int) -> None:
        """Enqueue an operation (after the ledger commit that created it)."""

    def receive(self, timeout_s: float, max_messages: int = 100) -> list[Message]:
        """Messages to work on. This consumer's delivered-but-unacknowledged messages come back first
        (without waiting); else wait up to timeout_s for new ones; [] on timeout. Every message
        received must eventually be acknowledged, or it is delivered again."""

    def ack(self, messages: Iterable[Message]) -> None:
        """Acknowledge and remove messages. Call only after the ledger commit that recorded them."""

    def pending_seqs(self) -> set[int]:
        """Seqs in the queue: waiting, or delivered and not yet acknowledged."""

    def depth(self) -> int:
        """Number of messages in the queue (waiting or unacknowledged)."""

    def ensure(self, seqs: Iterable[int]) -> int:
        """Publish those seqs not in the queue (re-enqueue after a Redis flush); return how many."""

    def ping(self) -> None:
        """Raise service.errors.Unavailable unless the queue is reachable."""

    def close(self) -> None:
        """Release connections; a blocked receive returns."""
