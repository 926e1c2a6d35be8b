"""One fault trial: a worker started from scratch, a random mix of requests over HTTP, a fault (the
worker SIGKILLed at a random moment or at a named fault point, Redis SIGKILLed and restarted empty,
or both; the private Postgres stopped and started again while requests arrive and the worker works;
the API SIGKILLed between a ledger write and its enqueue), a worker that catches up (a fresh one
after a worker kill, the same one after a store outage), and the invariants of tests/chaos/invariants.py.

Every trial begins with a worker that has no factor-store snapshot, so it replays every factor of the
ledger so far (and refuses to start if that does not give the recorded digest); the worker that
recovers from the fault starts from the snapshot its predecessor wrote plus the operations after it.
Both restart paths are therefore exercised, and a third, in-process replay from scratch is compared
with the weights the recovered worker serves.
"""
from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from sqlalchemy import func, select

from service.ledger.models import IdempotencyKey, Operation
from service.queue.local import LocalQueue
from tests.chaos.cluster import Cluster, wait_for
from tests.chaos.invariants import Findings, ServedState, check_ledger, check_weights, pending_operations
from tests.chaos.workload import Workload, edit_request

FAULT_POINTS = ("after_compute", "after_commit", "during_rollback")  # KNOWPATCH_FAULT_INJECTION of the worker
API_FAULT = "after_ledger_write"  # KNOWPATCH_FAULT_INJECTION of the API: SIGKILL after a ledger write, before its enqueue
WORKER_KILLS = ("random", *FAULT_POINTS)
REDIS_KILLS = ("redis", "redis+worker")
POSTGRES_STOPS = ("postgres",)  # the private Postgres stopped -m fast, then -m immediate, and started again
API_KILLS = ("api_kill",)  # the API killed at API_FAULT, then restarted as a supervisor would
KINDS = WORKER_KILLS + REDIS_KILLS + POSTGRES_STOPS + API_KILLS
RANDOM_KILL_WINDOW_S = 6.0  # a kill lands uniformly in this window after the requests start
FAULT_TIMEOUT_S = 120.0  # a fault point not reached by then (all requests refused, say) ends in a plain kill
POSTGRES_DOWN_S = (1.0, 5.0)  # how long Postgres stays stopped, drawn uniformly
BUSY_WAIT_S = 20.0  # longest wait for the worker to be applying something before the first Postgres stop
CATCH_UP_S = 300.0


class Replayer:
    """A replay of the whole ledger from scratch in this process: the code a worker with no snapshot
    runs (Worker.replay), on an editor built from the cluster's settings. Torch should run on one
    thread meanwhile (the conftest fixture sees to it): on a busy machine the thread pool's spinning
    makes the tiny model's steps many times slower."""

    def __init__(self, cluster: Cluster) -> None:
        from service.bootstrap import build_editor
        from service.config import Settings

        env = cluster.env
        settings = Settings(model=env["KNOWPATCH_MODEL"], corpus=env["KNOWPATCH_CORPUS"], layers=[1, 2, 3],
                            stats_tokens=64, nullspace_threshold=1e-9, cache_dir=cluster.cache_dir,
                            device="cpu", dtype="float32", method="alphaedit", profile="default")
        self.editor = build_editor(settings, progress=False, keep_factors=False)
        self.sessions = cluster.sessions

    def replay(self) -> tuple[ServedState, str | None]:
        """(version and digest of the replayed weights, the replay's own complaint or None)."""
        from workers.worker import Worker

        try:
            Worker(self.editor, self.sessions, LocalQueue()).replay()
            complaint = None
        except Exception as exc:  # LedgerCorrupt: the factors do not give the recorded digest
            complaint = f"{type(exc).__name__}: {exc}"
        return ServedState(self.editor.version, self.editor.weights_digest()), complaint


@dataclass
class TrialResult:
    kind: str
    seed: int
    accepted_edits: int = 0
    accepted_rollbacks: int = 0
    cancels: int = 0
    in_flight: int = 0  # operations accepted and not finished when the fault struck
    fault_reached: bool = True  # for fault points: the worker died there (not killed after a timeout)
    lost: int = 0
    duplicated: int = 0
    inconsistent: int = 0
    weight_mismatches: int = 0
    server_errors: int = 0  # 5xx answers to the workload's requests, but for the documented 503s of an outage
    unavailable: int = 0  # 503 Unavailable with Retry-After while Postgres was down: the documented answer
    postgres_stops: list[str] = field(default_factory=list)  # the modes of the stops (pg_ctl stop -m)
    busy_at_stop: int = 0  # Postgres stops that struck while the worker had an operation applying
    not_recovered: int = 0  # a process that died or stayed unready, work left pending
    statuses: dict[str, int] = field(default_factory=dict)  # of the accepted edits, at the end
    chain_length: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _served(cluster: Cluster) -> ServedState:
    info = cluster.worker_info()
    return ServedState(info.get("model_version"), info.get("details", {}).get("weights_digest"))


def _cold_start(cluster: Cluster, fault: str | None, findings: Findings) -> None:
    """A worker from scratch (no snapshot): it must come up serving the ledger head's weights. The one
    running, if any, is killed idle (its snapshot would be dropped anyway)."""
    cluster.kill_worker()
    cluster.drop_snapshot()
    cluster.start_worker(fault)
    if not cluster.worker_alive():
        findings.inconsistent.append(f"a worker with no snapshot did not start: {cluster.worker.tail() if cluster.worker else ''}")
        return
    served = _served(cluster)
    check_weights(cluster.sessions, served, served, findings)


def _kill_worker_at_fault(cluster: Cluster, workload: Workload, kind: str, result: TrialResult) -> None:
    workload.submit(workload.rng.randint(3, 6), rollbacks=1 if kind == "during_rollback" else 0)
    if kind != "during_rollback":
        workload.edit()  # last, so no cancel in the mix can take it: the worker computes at least one edit
    try:
        wait_for(lambda: not cluster.worker_alive(), f"the worker dies at {kind}", FAULT_TIMEOUT_S, poll_s=0.05)
    except AssertionError:
        result.fault_reached = False
        cluster.kill_worker()
    result.in_flight = pending_operations(cluster.sessions)


def _kill_worker_at_random(cluster: Cluster, workload: Workload, result: TrialResult) -> None:
    started = time.monotonic()
    workload.submit(workload.rng.randint(3, 6))
    time.sleep(max(0.0, workload.rng.uniform(0, RANDOM_KILL_WINDOW_S) - (time.monotonic() - started)))
    result.in_flight = pending_operations(cluster.sessions)
    cluster.kill_worker()


def _kill_redis(cluster: Cluster, workload: Workload, kind: str, result: TrialResult) -> None:
    rng = workload.rng
    workload.submit(rng.randint(2, 4))
    time.sleep(rng.uniform(0, 2))
    result.in_flight = pending_operations(cluster.sessions)
    cluster.redis.kill()
    if kind == "redis+worker":
        cluster.kill_worker()
    workload.submit(rng.randint(1, 3))  # accepted while Redis is down: recorded, not enqueued
    time.sleep(rng.uniform(0.5, 3))
    cluster.redis.start()


def _applying(cluster: Cluster) -> int:
    """Operations the worker has claimed and not finished (it is computing or committing them)."""
    with cluster.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Operation).where(Operation.status == "applying")))


def _keep_sending(workload: Workload, done: threading.Event) -> None:
    """Requests one after another until `done`, in a thread: they arrive while Postgres stops, is down and
    starts again. A dropped connection (the API should always answer) is an unexpected answer."""
    while not done.is_set():
        try:
            workload.submit(1)
        except httpx.HTTPError as exc:
            workload.accepted.unexpected.append(f"no answer while Postgres was down: {type(exc).__name__}: {exc}")
        done.wait(workload.rng.uniform(0.3, 1.0))  # a few requests a second: the worker must catch up after


def _stop_postgres(cluster: Cluster, workload: Workload, result: TrialResult, findings: Findings) -> None:
    """The private Postgres stopped twice, -m fast once the worker is applying something (mid-computation
    or mid-commit), then -m immediate (a crash: WAL recovery at the start) at a random moment, each for
    1-5 s, while another client keeps sending requests; then started again. No process of ours is
    restarted: the API answers 503 meanwhile and the worker backs off, and both carry on by themselves."""
    postgres = cluster.private_postgres
    assert postgres is not None, f"no private Postgres: {cluster.private_postgres_missing}"
    assert cluster.worker is not None and cluster.worker.proc is not None and cluster.api is not None
    rng = workload.rng
    processes = {"worker": cluster.worker.proc, "API": cluster.api.proc}
    for mode in ("fast", "immediate"):
        workload.submit(rng.randint(2, 4))
        if mode == "fast":
            try:
                wait_for(lambda: _applying(cluster) > 0, "the worker applies something", BUSY_WAIT_S, poll_s=0.05)
            except AssertionError:
                pass  # everything was refused or cancelled: the stop still lands while requests arrive
            time.sleep(rng.uniform(0, 0.5))
        else:
            time.sleep(rng.uniform(0, 2))
        result.in_flight += pending_operations(cluster.sessions)
        result.busy_at_stop += _applying(cluster) > 0
        side = Workload(cluster, random.Random(rng.random()), outage=True, own_clients=True)
        done = threading.Event()
        sender = threading.Thread(target=_keep_sending, args=(side, done), name="chaos-requests", daemon=True)
        sender.start()
        try:
            time.sleep(0.1)
            postgres.stop(mode)
            result.postgres_stops.append(mode)
            time.sleep(rng.uniform(*POSTGRES_DOWN_S))
        finally:
            if not postgres.running():
                postgres.start()
            done.set()
            sender.join(120)
        side.retry_deferred()  # what was refused with 503, sent again with its Idempotency-Key
        side.close()
        workload.accepted.add(side.accepted)
    for name, proc in processes.items():
        if proc.poll() is not None:
            findings.recovery.append(f"the {name} process exited ({proc.returncode}) during the Postgres outages")


def _kill_api_after_ledger_write(cluster: Cluster, workload: Workload, result: TrialResult,
                                 findings: Findings) -> None:
    """The API restarted with KNOWPATCH_FAULT_INJECTION=after_ledger_write: the next edit or rollback it
    takes is committed to the ledger and the API SIGKILLs itself before enqueueing it, so the client
    gets no answer. The API is started again (its supervisor's job); the client sends its edits again
    with the same Idempotency-Key and must get the ledger's edits back. The operation the killed API
    wrote must then be carried out with no queue message for it and nothing else sent meanwhile, once."""
    rng = workload.rng
    workload.submit(rng.randint(1, 3))
    # Nothing left in the queue, so that no other message can wake the worker for the killed API's operation.
    wait_for(lambda: pending_operations(cluster.sessions) == 0, "the ledger has no pending operations", CATCH_UP_S, 0.2)
    cluster.stop_api()
    cluster.start_api(API_FAULT)
    with cluster.sessions() as session:
        last_seq = int(session.scalar(select(func.coalesce(func.max(Operation.seq), 0))))
        rolling_back = set(session.scalars(select(Operation.edit_id).where(
            Operation.kind == "rollback", Operation.status.in_(("queued", "applying")))))
    applied = [e for e in workload._applied() if e not in rolling_back]  # a second rollback would get 409
    what = rng.choice(["edit", "edit_list"] + (["rollback"] if applied else []))
    key, edit_id = uuid.uuid4().hex, rng.choice(applied) if what == "rollback" else None
    body = edit_request(rng) if what == "edit" else {"edits": [edit_request(rng) for _ in range(rng.randint(2, 4))]}
    result.in_flight = pending_operations(cluster.sessions)
    try:
        if edit_id is not None:
            reply = workload.client("admin").post(f"/edits/{edit_id}/rollback", json={"reason": "chaos: API killed"})
        else:
            reply = workload.client().post("/edits", json=body, headers={"Idempotency-Key": key})
    except httpx.TransportError:
        reply = None  # no answer: what the fault point does
    try:
        wait_for(lambda: not cluster.api_alive(), f"the API dies at {API_FAULT}", 10 if reply else 60, poll_s=0.05)
    except AssertionError:
        cluster.stop_api()
    assert cluster.api is not None and cluster.api.proc is not None
    result.fault_reached = reply is None and cluster.api.proc.returncode == -signal.SIGKILL
    cluster.start_api()  # its supervisor restarts it
    if reply is not None:  # the fault point was not reached (a refusal, say): an ordinary answer
        answer = workload._answer(f"{what} to the API started with {API_FAULT}", reply)
        if answer is not None and edit_id is not None:
            workload.accepted.rollbacks.append((edit_id, answer["rollback_seq"]))
        elif answer is not None:
            workload.accepted.edits += [e["id"] for e in answer["edits"]] if "edits" in answer else [answer["id"]]
        return
    with cluster.sessions() as session:
        written = [op for op in session.scalars(select(Operation).where(Operation.seq > last_seq))]
        keyed = session.get(IdempotencyKey, ("writer", key))
        keyed_ids = list(keyed.edit_ids) if keyed is not None else []
    if edit_id is not None:
        mine = [op for op in written if op.kind == "rollback" and op.edit_id == edit_id]
        workload.accepted.rollbacks += [(edit_id, op.seq) for op in mine]
    else:
        mine = [op for op in written if op.kind == "apply" and op.edit_id in keyed_ids]
        again = workload._answer(f"POST /edits ({what}) sent again after the API died",
                                 workload.client().post("/edits", json=body, headers={"Idempotency-Key": key}))
        if again is not None:
            ids = [e["id"] for e in again["edits"]] if "edits" in again else [again["id"]]
            workload.accepted.edits += ids
            workload.accepted.keyed.append(("writer", key, ids))
    if result.fault_reached and not mine:
        findings.inconsistent.append(f"the API died at {API_FAULT} but the ledger holds no operation of its {what}")
    seqs = {op.seq for op in mine}

    def carried_out() -> bool:
        with cluster.sessions() as session:
            return not session.scalar(select(func.count()).select_from(Operation).where(
                Operation.seq.in_(seqs), Operation.status.in_(("queued", "applying"))))

    try:
        wait_for(carried_out, f"operations {sorted(seqs)}, written by the killed API, are carried out", CATCH_UP_S, 0.2)
    except AssertionError as exc:
        findings.lost.append(f"{exc}: they were never enqueued, and nothing took them from the ledger")


def run_trial(cluster: Cluster, replayer: Replayer, kind: str, seed: int, cold_start: bool = False) -> TrialResult:
    """One trial of `kind` (KINDS); its result lists every invariant that failed. A fault point needs a
    worker started with it, which starts cold; the other kinds reuse a running worker unless
    `cold_start`."""
    assert kind in KINDS, kind
    started = time.monotonic()
    rng = random.Random(seed)
    result, findings = TrialResult(kind, seed), Findings()
    if cold_start or kind in FAULT_POINTS or not cluster.worker_alive():
        _cold_start(cluster, kind if kind in FAULT_POINTS else None, findings)
    workload = Workload(cluster, rng)
    try:
        if kind == "during_rollback":
            workload.ensure_applied()
        if kind in FAULT_POINTS:
            _kill_worker_at_fault(cluster, workload, kind, result)
        elif kind == "random":
            _kill_worker_at_random(cluster, workload, result)
        elif kind in REDIS_KILLS:
            _kill_redis(cluster, workload, kind, result)
        elif kind in POSTGRES_STOPS:
            _stop_postgres(cluster, workload, result, findings)
        else:
            _kill_api_after_ledger_write(cluster, workload, result, findings)
        workload.submit(rng.randint(0, 2))  # requests while the worker is down (or just back)
    finally:  # whatever happened, the next trial finds the stores and the API up
        if cluster.private_postgres is not None and not cluster.private_postgres.running():
            cluster.private_postgres.start()
        if not cluster.api_alive():
            cluster.start_api()
    if not cluster.worker_alive():
        cluster.start_worker()
    try:
        wait_for(lambda: pending_operations(cluster.sessions) == 0, "the ledger has no pending operations",
                 CATCH_UP_S, 0.2)
    except AssertionError as exc:
        findings.recovery.append(f"{exc} ({pending_operations(cluster.sessions)} queued or applying)")
    if kind in POSTGRES_STOPS:
        _check_ready(cluster, findings)
    _check(cluster, replayer, workload, findings)
    _fill(result, workload, findings, time.monotonic() - started)
    return result


def _check_ready(cluster: Cluster, findings: Findings, timeout_s: float = 120) -> None:
    """The API's /ready (the ledger, the queue and the worker's loop through it) is 200 again."""
    try:
        wait_for(lambda: httpx.get(f"{cluster.api_url}/ready", timeout=10).status_code == 200,
                 "the API is ready again", timeout_s, poll_s=0.5)
    except AssertionError as exc:
        reply = httpx.get(f"{cluster.api_url}/ready", timeout=10)
        findings.recovery.append(f"{exc}: /ready {reply.status_code} {reply.text[:300]}")


def _check(cluster: Cluster, replayer: Replayer, workload: Workload, findings: Findings) -> None:
    ledger = check_ledger(cluster.sessions, workload.accepted, layers=3)
    for name in ("lost", "duplicated", "inconsistent", "weight_mismatches"):
        getattr(findings, name).extend(getattr(ledger, name))
    findings.statuses, findings.chain_length = ledger.statuses, ledger.chain_length
    replayed, complaint = replayer.replay()
    if complaint:
        findings.weight_mismatches.append(f"the replay from scratch failed: {complaint}")
    check_weights(cluster.sessions, _served(cluster), replayed, findings)


def _fill(result: TrialResult, workload: Workload, findings: Findings, seconds: float) -> None:
    accepted = workload.accepted
    result.accepted_edits, result.accepted_rollbacks = len(accepted.edits), len(accepted.rollbacks)
    result.cancels = len(accepted.cancels)
    result.lost, result.duplicated = len(findings.lost), len(findings.duplicated)
    result.inconsistent, result.weight_mismatches = len(findings.inconsistent), len(findings.weight_mismatches)
    result.unavailable = accepted.unavailable
    result.server_errors = sum(n for status, n in accepted.statuses.items() if status >= 500) - accepted.unavailable
    result.not_recovered = len(findings.recovery)
    result.statuses, result.chain_length = dict(findings.statuses), findings.chain_length
    result.seconds = round(seconds, 1)
    result.problems = findings.problems + [f"unexpected answer: {x}" for x in accepted.unexpected]


def summarize(results: list[TrialResult]) -> dict[str, Any]:
    """The figures of a run of trials."""
    by_kind = Counter(r.kind for r in results)
    return {
        "trials": len(results), "by_kind": dict(by_kind),
        "edits_accepted": sum(r.accepted_edits for r in results),
        "rollbacks_accepted": sum(r.accepted_rollbacks for r in results),
        "in_flight_at_fault": sum(r.in_flight for r in results),
        "fault_points_reached": sum(r.fault_reached for r in results if r.kind in FAULT_POINTS),
        "fault_point_trials": sum(by_kind[k] for k in FAULT_POINTS),
        "api_fault_reached": sum(r.fault_reached for r in results if r.kind in API_KILLS),
        "api_kill_trials": sum(by_kind[k] for k in API_KILLS),
        "postgres_stops": dict(Counter(mode for r in results for mode in r.postgres_stops)),
        "postgres_stops_while_applying": sum(r.busy_at_stop for r in results),
        "unavailable_503": sum(r.unavailable for r in results),
        "not_recovered": sum(r.not_recovered for r in results),
        "lost": sum(r.lost for r in results), "duplicated": sum(r.duplicated for r in results),
        "inconsistent": sum(r.inconsistent for r in results),
        "weight_mismatches": sum(r.weight_mismatches for r in results),
        "server_errors": sum(r.server_errors for r in results),
        "failed_trials": sum(not r.ok for r in results),
        "final_statuses": sum((Counter(r.statuses) for r in results), Counter()),
        "chain_length": max((r.chain_length for r in results), default=0),
        "seconds": round(sum(r.seconds for r in results), 1),
    }
