"""One fault trial: a worker started from scratch, a random mix of requests over HTTP, a fault (the
worker SIGKILLed at a random moment or at a named fault point, Redis SIGKILLed and restarted empty,
or both), a fresh worker that catches up, and the invariants of tests/chaos/invariants.py.

Every trial begins with a worker that has no factor-store snapshot, so it replays every factor of the
ledger so far (and refuses to start if that does not give the recorded digest); the worker that
recovers from the fault starts from the snapshot its predecessor wrote plus the operations after it.
Both restart paths are therefore exercised, and a third, in-process replay from scratch is compared
with the weights the recovered worker serves.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from service.queue.local import LocalQueue
from tests.chaos.cluster import Cluster, wait_for
from tests.chaos.invariants import Findings, ServedState, check_ledger, check_weights, pending_operations
from tests.chaos.workload import Workload

FAULT_POINTS = ("after_compute", "after_commit", "during_rollback")  # KNOWPATCH_FAULT_INJECTION
WORKER_KILLS = ("random", *FAULT_POINTS)
REDIS_KILLS = ("redis", "redis+worker")
KINDS = WORKER_KILLS + REDIS_KILLS
RANDOM_KILL_WINDOW_S = 6.0  # a kill lands uniformly in this window after the requests start
FAULT_TIMEOUT_S = 120.0  # a fault point not reached by then (all requests refused, say) ends in a plain kill
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
    server_errors: int = 0  # 5xx answers to the workload's requests
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
    if kind == "during_rollback":
        workload.ensure_applied()
    if kind in FAULT_POINTS:
        _kill_worker_at_fault(cluster, workload, kind, result)
    elif kind == "random":
        _kill_worker_at_random(cluster, workload, result)
    else:
        _kill_redis(cluster, workload, kind, result)
    workload.submit(rng.randint(0, 2))  # requests while the worker is down (or just back)
    if not cluster.worker_alive():
        cluster.start_worker()
    wait_for(lambda: pending_operations(cluster.sessions) == 0, "the ledger has no pending operations", CATCH_UP_S, 0.2)
    _check(cluster, replayer, workload, findings)
    _fill(result, workload, findings, time.monotonic() - started)
    return result


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
    result.server_errors = sum(n for status, n in accepted.statuses.items() if status >= 500)
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
        "lost": sum(r.lost for r in results), "duplicated": sum(r.duplicated for r in results),
        "inconsistent": sum(r.inconsistent for r in results),
        "weight_mismatches": sum(r.weight_mismatches for r in results),
        "server_errors": sum(r.server_errors for r in results),
        "failed_trials": sum(not r.ok for r in results),
        "final_statuses": sum((Counter(r.statuses) for r in results), Counter()),
        "chain_length": max((r.chain_length for r in results), default=0),
        "seconds": round(sum(r.seconds for r in results), 1),
    }
