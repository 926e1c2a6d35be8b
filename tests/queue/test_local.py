"""The in-process queue of the embedded deployment."""
from __future__ import annotations

import threading
import time

import pytest

from service.errors import Unavailable
from service.queue import LocalQueue, OperationQueue


def test_is_an_operation_queue() -> None:
    assert isinstance(LocalQueue(), OperationQueue)


def test_publish_receive_ack() -> None:
    q = LocalQueue()
    for seq in (3, 1, 2):
        q.publish(seq)
    got = q.receive(0.1)
    assert [m.seq for m in got] == [3, 1, 2]  # publish order
    assert q.depth() == 3 and q.pending_seqs() == {1, 2, 3}  # unacknowledged still count
    q.ack(got)
    assert q.depth() == 0 and q.pending_seqs() == set()
    started = time.monotonic()
    assert q.receive(0.1) == []
    assert 0.08 <= time.monotonic() - started < 1


def test_max_messages() -> None:
    q = LocalQueue()
    for seq in range(5):
        q.publish(seq)
    first = q.receive(0, max_messages=2)
    assert [m.seq for m in first] == [0, 1]
    q.ack(first)
    assert [m.seq for m in q.receive(0, max_messages=10)] == [2, 3, 4]


def test_unacknowledged_messages_come_back() -> None:
    q = LocalQueue()
    q.publish(7)
    first = q.receive(0.1)
    q.publish(8)
    again = q.receive(0.1)  # the worker failed before acknowledging: same message first
    assert again == first
    q.ack(again)
    assert [m.seq for m in q.receive(0.1)] == [8]


def test_receive_wakes_on_publish_and_on_close() -> None:
    q = LocalQueue()
    threading.Timer(0.05, q.publish, args=(42,)).start()
    started = time.monotonic()
    got = q.receive(5)
    assert [m.seq for m in got] == [42]
    assert time.monotonic() - started < 2
    q.ack(got)
    threading.Timer(0.05, q.close).start()
    started = time.monotonic()
    assert q.receive(5) == []
    assert time.monotonic() - started < 2
    with pytest.raises(Unavailable):
        q.publish(1)
    with pytest.raises(Unavailable):
        q.ping()


def test_ensure_publishes_only_missing_seqs() -> None:
    q = LocalQueue()
    q.publish(1)
    assert q.ensure([1, 2, 3, 2]) == 2
    assert q.ensure([1, 2, 3]) == 0
    assert sorted(m.seq for m in q.receive(0)) == [1, 2, 3]
