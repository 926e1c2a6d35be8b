"""The worker loop on a real ledger (SQLite, Postgres) and a real tiny editor: apply, roll back, replay
from the factor-store snapshot and from every factor, with the same weights bit for bit; and the
loop outliving what goes wrong (a computation that fails, the ledger or Redis going away, an
operation that keeps failing, a hung queue), with not_ready() saying why meanwhile."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import update

from api.probes import readiness
from service.engine.editor import Editor
from service.engine.types import HyperParams
from service.ledger import repository as repo
from service.ledger.db import make_engine, migrate, session_factory
from service.ledger.models import Edit, Operation
from service.model.loading import load_model
from service.queue.local import LocalQueue
from service.queue.redis_streams import RedisStreamQueue
from tests.api.conftest import serve
from tests.conftest import postgres_down, submit_edits
from tests.engine.conftest import CACHE_DIR, tiny_model, wikitext_moments
from workers.inference import LocalBackend
from workers.server import create_worker_app
from workers.worker import Worker

T = TypeVar("T")

HP = HyperParams(layers=(1, 2, 3), v_num_grad_steps=5, stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)
SUBJECTS = ["Eiffel Tower", "Big Ben", "Colosseum", "Golden Gate Bridge"]


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    tokenizer = load_model("smollm2", cache_dir=CACHE_DIR).tokenizer
    moments = wikitext_moments(tiny_model("llama", tokenizer), HP)
    return tokenizer, moments


def _editor(parts) -> Editor:
    tokenizer, moments = parts
    return Editor(tiny_model("llama", tokenizer), HP, moments, templates=["{}"], keep_factors=False)


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def _drain(worker: Worker) -> None:
    while worker.process_next():
        pass


def test_edits_and_a_rollback_replay_to_the_same_weights_from_the_snapshot_and_from_scratch(
        parts, sessions, tmp_path, caplog):
    snapshot = tmp_path / "snap.pt"
    live = Worker(_editor(parts), sessions, LocalQueue(), batch_size=2, snapshot_path=snapshot, snapshot_every=2)
    ids = submit_edits(sessions, SUBJECTS[:3])
    _drain(live)
    assert snapshot.is_file()  # written after the first 2 operations
    with sessions() as session:
        repo.request_rollback(session, ids[0], reason="wrong", actor="test")
        session.commit()
    submit_edits(sessions, SUBJECTS[3:])
    _drain(live)  # after the snapshot: one rollback and one more edit
    with sessions() as session:
        statuses = [repo.get_edit(session, i).status for i in ids]
        assert statuses == ["rolled_back", "applied", "applied"]
        assert repo.get_edit(session, ids[1]).settings["hparams"]["layers"] == [1, 2, 3]
    served = live.editor.weights_digest()

    caplog.set_level(logging.INFO, logger="workers.worker")
    restarted = Worker(_editor(parts), sessions, LocalQueue(), snapshot_path=snapshot)
    assert restarted.replay() == 3
    assert "snapshot at seq" in caplog.text and restarted.editor.weights_digest() == served

    caplog.clear()
    cold = Worker(_editor(parts), sessions, LocalQueue())  # no snapshot: every factor read
    assert cold.replay() == 3
    assert "all factors read" in caplog.text and cold.editor.weights_digest() == served


def _restart_from_tampered_snapshot(parts, sessions, snapshot: Path, tamper) -> tuple[Worker, Worker]:
    """Two edits applied with a snapshot after each, the snapshot changed by `tamper`, then a new
    worker replayed: (the live worker, the restarted one)."""
    live = Worker(_editor(parts), sessions, LocalQueue(), snapshot_path=snapshot, snapshot_every=1)
    submit_edits(sessions, SUBJECTS[:2])
    _drain(live)
    state = torch.load(snapshot, weights_only=True)
    tamper(state)
    torch.save(state, snapshot)
    restarted = Worker(_editor(parts), sessions, LocalQueue(), snapshot_path=snapshot)
    restarted.replay()
    return live, restarted


def test_a_snapshot_of_another_ledger_is_ignored(parts, sessions, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    def other_ledger(state: dict) -> None:
        state["hash"] = "0" * 64  # not the chain hash of its seq in this ledger

    live, restarted = _restart_from_tampered_snapshot(parts, sessions, tmp_path / "snap.pt", other_ledger)
    assert "not a state of this ledger" in caplog.text
    assert restarted.editor.weights_digest() == live.editor.weights_digest()


def test_a_corrupted_factor_fails_the_rollback_that_reads_it(parts, sessions, tmp_path):
    live = Worker(_editor(parts), sessions, LocalQueue())
    ids = submit_edits(sessions, SUBJECTS[:1])
    _drain(live)
    with sessions() as session:
        from service.ledger.models import EditFactor

        row = session.get(EditFactor, (ids[0], 1))
        row.r = bytes(len(row.r))
        session.commit()
        repo.request_rollback(session, ids[0], reason="x", actor="test")
        session.commit()
    served = live.editor.weights_digest()
    assert live.process_next()
    with sessions() as session:  # the rollback fails with the reason; the model and the edit stay
        events = [e.reason or "" for e in repo.edit_events(session, ids[0])]
        assert repo.get_edit(session, ids[0]).status == "applied"
    assert any("do not match their checksum" in reason for reason in events), events
    assert live.editor.weights_digest() == served


def test_a_snapshot_that_does_not_reproduce_the_digest_is_replaced(parts, sessions, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    snapshot = tmp_path / "snap.pt"

    def wrong_sums(state: dict) -> None:
        state["sums"][1] += 2 ** 40  # right ledger position, wrong sums (2^-12 in weight units)

    live, restarted = _restart_from_tampered_snapshot(parts, sessions, snapshot, wrong_sums)
    assert "do not reproduce the recorded weights" in caplog.text
    assert restarted.editor.weights_digest() == live.editor.weights_digest()
    assert torch.equal(torch.load(snapshot, weights_only=True)["sums"][1], restarted.editor.store._sum[1])


# ---- the loop outlives what goes wrong -------------------------------------------------------------

POLL_S = 0.05


@contextmanager
def running(worker: Worker) -> Iterator[threading.Thread]:
    """worker.start() and its loop in a thread, as knowpatch serve runs them; stopped afterwards."""
    worker.start()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, POLL_S), name="test-worker", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(30)


def eventually(check: Callable[[], T], what: str, timeout_s: float = 120.0) -> T:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.02)
    return value


def status(sessions, edit_id: str) -> str:
    with sessions() as session:
        return repo.get_edit(session, edit_id).status


def test_a_computation_that_fails_fails_its_edit_and_the_loop_goes_on(parts, sessions):
    editor = _editor(parts)
    worker = Worker(editor, sessions, LocalQueue())

    def out_of_memory(module, args):  # what torch raises when the GPU runs out, from inside the forward pass
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = editor.model.model.layers[1].register_forward_pre_hook(out_of_memory)
    with running(worker) as thread:
        [failed] = submit_edits(sessions, SUBJECTS[:1])
        eventually(lambda: status(sessions, failed) == "failed", "the edit failed")
        hook.remove()
        [applied] = submit_edits(sessions, SUBJECTS[1:2])
        eventually(lambda: status(sessions, applied) == "applied", "the next edit applied")
        assert thread.is_alive() and worker.not_ready() is None
    with sessions() as session:
        assert repo.get_edit(session, failed).error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert editor.version == repo_head(sessions)


def repo_head(sessions) -> int:
    with sessions() as session:
        return repo.head(session)[0]


def test_an_operation_that_keeps_failing_is_failed_after_max_attempts(parts, sessions):
    bad, good = submit_edits(sessions, SUBJECTS[:2])
    with sessions.begin() as session:  # a request this worker cannot read (written by another version, say)
        session.execute(update(Edit).where(Edit.id == bad).values(request={"subject": SUBJECTS[0]}))
    worker = Worker(_editor(parts), sessions, LocalQueue(), max_attempts=3)
    with running(worker) as thread:
        eventually(lambda: status(sessions, good) == "applied", "the good edit applied")
        eventually(lambda: worker.not_ready() is None, "ready again once an iteration succeeds")
        assert thread.is_alive()
    with sessions() as session:
        edit = repo.get_edit(session, bad)
        attempts = {e.id: session.get(Operation, e.seq).attempts for e in (edit, repo.get_edit(session, good))}
    assert edit.status == "failed"
    assert edit.error == "given up after 3 attempts; the last failed with: KeyError: 'prompt'"
    # The first claim took both; then the one left unfinished was retried alone, and the good one after it.
    assert attempts == {bad: 4, good: 2}


def test_the_loop_waits_out_a_ledger_outage(parts, pg_url):
    migrate(pg_url)
    engine = make_engine(pg_url)
    sessions = session_factory(engine)
    worker = Worker(_editor(parts), sessions, LocalQueue())
    try:
        with running(worker) as thread:
            with postgres_down(pg_url):
                why = eventually(worker.not_ready, "the worker says it is not applying edits")
                assert why.startswith("the worker is not applying edits; it is retrying after: the ledger database at ")
                time.sleep(10 * POLL_S)  # several retries, backing off
                assert thread.is_alive()
            [edit] = submit_edits(sessions, SUBJECTS[:1])
            eventually(lambda: status(sessions, edit) == "applied", "the edit applied once the ledger is back")
            eventually(lambda: worker.not_ready() is None, "ready again once an iteration succeeds")
    finally:
        engine.dispose()


class FlakyProxy:
    """A TCP forwarder on a loopback port to a real server, which a test can freeze (bytes held: the
    server hangs), cut (connections closed and the port refused: the server is down) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()

    def restore(self) -> None:
        self.frozen.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        listener.settimeout(0.05)
        self.port, self._listener = listener.getsockname()[1], listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def freeze(self) -> None:
        self.frozen.set()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()
        self.frozen.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def close(self) -> None:
        self.cut()


def test_a_hung_then_lost_redis_is_reported_and_waited_out(parts, sessions, redis_url):
    target = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    proxy = FlakyProxy((target["host"], target["port"]))
    # The service's client, less its own retries and with a short read timeout, so the test is quick.
    client = redis.Redis(host="127.0.0.1", port=proxy.port, db=target.get("db", 0), decode_responses=True,
                         socket_connect_timeout=2, socket_timeout=3, retry=Retry(NoBackoff(), 0))
    stream = f"kp-test-{uuid.uuid4().hex[:8]}"
    queue = RedisStreamQueue(f"redis://127.0.0.1:{proxy.port}", stream, "workers", "test", client=client)
    editor = _editor(parts)
    worker = Worker(editor, sessions, queue)
    backend = LocalBackend(editor, not_ready=worker.not_ready)
    try:
        with running(worker) as thread:
            eventually(lambda: worker.loop.beat is not None and worker.not_ready() is None, "the loop runs")
            proxy.freeze()  # the loop now waits on a reply that does not come
            stuck = eventually(worker.not_ready, "the stuck loop is reported")
            assert "it is stuck" in stuck and f"it polls every {POLL_S:g} s" in stuck, stuck
            proxy.cut()
            down = eventually(lambda: "Redis" in (worker.not_ready() or ""), "the lost queue is reported")
            assert thread.is_alive()
            [edit] = submit_edits(sessions, SUBJECTS[:1])
            time.sleep(10 * POLL_S)
            assert status(sessions, edit) == "queued", down  # nothing is processed while the queue is away
            proxy.restore()
            eventually(lambda: status(sessions, edit) == "applied", "the edit applied once Redis is back")
            eventually(lambda: worker.not_ready() is None, "ready again")
        stopped = worker.not_ready()
        assert stopped == "the worker loop has stopped (the worker is shutting down): edits are not applied"
        ready = asyncio.run(readiness(sessions, queue, backend))  # what the API's /ready answers
        assert not ready.ready and ready.checks["backend"] == stopped
        with serve(create_worker_app(backend, token="t" * 16, max_new_tokens_limit=64)) as url:  # the worker's own /ready
            reply = httpx.get(f"{url}/ready")
            assert reply.status_code == 503 and reply.json() == {"ready": False, "message": stopped}
    finally:
        proxy.close()
        redis.Redis.from_url(redis_url).delete(stream)
        client.close()


def test_weights_that_lag_the_ledger_catch_up_after_an_error(parts, sessions):
    """A COMMIT that raised may have committed: the ledger then holds operations the weights lack."""
    lagging = Worker(_editor(parts), sessions, LocalQueue())
    lagging.start()
    ahead = Worker(_editor(parts), sessions, LocalQueue())
    ahead.start()
    ids = submit_edits(sessions, SUBJECTS[:2])
    _drain(ahead)  # stands in for the commit `lagging` did not learn of
    with sessions() as session:
        repo.request_rollback(session, ids[0], reason="wrong", actor="test")
        session.commit()
    _drain(ahead)
    lagging._unsure = True  # as run() leaves it after an exception
    lagging._catch_up()
    assert lagging.editor.version == ahead.editor.version == repo_head(sessions)
    assert lagging.editor.weights_digest() == ahead.editor.weights_digest()
