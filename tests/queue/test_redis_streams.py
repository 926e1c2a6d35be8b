"""The Redis stream queue on a real Redis. Each test uses its own stream and group, and deletes
only the keys it created."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from service.errors import Unavailable
from service.queue import OperationQueue, RedisStreamQueue

Factory = Callable[..., RedisStreamQueue]


@pytest.fixture
def stream(redis_url: str) -> Iterator[str]:
    name = f"knowpatch-test:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name)
    client.close()


@pytest.fixture
def make_queue(redis_url: str, stream: str) -> Iterator[Factory]:
    group = f"workers-{uuid.uuid4().hex[:8]}"
    made: list[RedisStreamQueue] = []

    def make(consumer: str = "worker-1", **kwargs: object) -> RedisStreamQueue:
        q = RedisStreamQueue(redis_url, stream, group, consumer, **kwargs)  # type: ignore[arg-type]
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def test_is_an_operation_queue(make_queue: Factory) -> None:
    assert isinstance(make_queue(), OperationQueue)


def test_publish_receive_ack(make_queue: Factory, redis_url: str, stream: str) -> None:
    api, worker = make_queue("api"), make_queue("worker-1")
    for seq in (5, 6, 7):
        api.publish(seq)  # before the group exists: still delivered (group starts at id 0)
    got = worker.receive(0.1)
    assert [m.seq for m in got] == [5, 6, 7]
    assert worker.depth() == 3 and api.pending_seqs() == {5, 6, 7}
    worker.ack(got)
    assert worker.depth() == 0 and worker.pending_seqs() == set()
    assert redis.Redis.from_url(redis_url).xlen(stream) == 0  # acknowledged = deleted
    started = time.monotonic()
    assert worker.receive(0.1) == []
    assert time.monotonic() - started < 2
    worker.ping()


def test_unacknowledged_messages_are_redelivered_after_a_crash(make_queue: Factory) -> None:
    make_queue("api").publish(11)
    crashed = make_queue("worker-1")
    assert [m.seq for m in crashed.receive(0.1)] == [11]  # ... and the process dies before ack
    restarted = make_queue("worker-1")
    again = restarted.receive(0.1)
    assert [m.seq for m in again] == [11]
    restarted.ack(again)
    assert restarted.receive(0.05) == [] and restarted.depth() == 0


def test_messages_of_a_dead_consumer_are_claimed(make_queue: Factory) -> None:
    make_queue("api").publish(21)
    dead = make_queue("worker-dead")
    assert [m.seq for m in dead.receive(0.1)] == [21]
    other = make_queue("worker-2", claim_idle_ms=50)
    assert other.receive(0.01) == []  # not idle long enough yet
    time.sleep(0.1)
    got = other.receive(0.1)
    assert [m.seq for m in got] == [21]
    other.ack(got)
    assert other.depth() == 0


def test_ensure_re_enqueues_after_the_stream_was_flushed(make_queue: Factory, redis_url: str,
                                                         stream: str) -> None:
    q = make_queue()
    q.publish(1)
    q.publish(2)
    assert q.ensure([1, 2]) == 0
    assert [m.seq for m in q.receive(0.1)] == [1, 2]
    redis.Redis.from_url(redis_url).delete(stream)  # Redis restarted empty / flushed
    assert q.depth() == 0 and q.pending_seqs() == set()
    assert q.ensure([1, 2, 3]) == 3
    got = q.receive(0.1)  # the group is gone too: recreated on the fly (NOGROUP)
    assert sorted(m.seq for m in got) == [1, 2, 3]
    q.ack(got)
    assert q.depth() == 0


def test_recovers_from_a_destroyed_group(make_queue: Factory, redis_url: str, stream: str) -> None:
    q = make_queue()
    q.publish(1)
    q.ack(q.receive(0.1))
    redis.Redis.from_url(redis_url).xgroup_destroy(stream, q.group)
    q.publish(2)
    assert [m.seq for m in q.receive(0.1)] == [2]


def test_unreadable_messages_are_dropped(make_queue: Factory, redis_url: str, stream: str) -> None:
    q = make_queue()
    redis.Redis.from_url(redis_url).xadd(stream, {"something": "else"})
    q.publish(4)
    assert [m.seq for m in q.receive(0.1)] == [4]
    assert q.depth() == 1


def test_unreachable_redis_raises_unavailable() -> None:
    q = RedisStreamQueue("redis://:secret@127.0.0.1:1/0", "s", "g", "c")
    with pytest.raises(Unavailable, match="unreachable") as info:
        q.ping()
    assert "secret" not in info.value.message
    with pytest.raises(Unavailable):
        q.publish(1)
    with pytest.raises(Unavailable):
        q.receive(0.01)
    q.close()
