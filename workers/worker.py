"""The worker: applies ledger operations in order to the editor's model, and replays at start-up.

Per batch: claim ops (commit) -> compute factors with no session open -> record them in the
ledger (one commit) -> swap the weights in. A crash before the ledger commit leaves the ops
claimed ('applying'), and they are taken again; a crash after it is repaired by the replay.

No exception ends the loop (run): an edit whose computation fails is failed in the ledger with the
reason; a ledger or queue that is down, or anything unexpected, is retried after a backoff; every
claim counts an attempt on the operation, and one still unfinished after max_attempts is failed.
not_ready() says when the loop is not doing its job, and why.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.engine.editor import BatchUpdate, Editor, WeightSwap
from service.engine.factors import EditFactors
from service.engine.gates import GateReport, Gates, Probe, evaluate, server_gates
from service.engine.types import EditRequest, RequestMetrics
from service.errors import KnowpatchError, LedgerCorrupt, Unavailable
from service.ledger import repository as repo
from service.ledger import tensors
from service.ledger.models import Operation
from service.queue.base import OperationQueue

log = logging.getLogger(__name__)

STALE_POLLS = 3  # a loop silent for this many poll intervals, outside a batch, counts as stuck
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Job:
    """A claimed apply operation, as plain data (no session is open while computing)."""

    seq: int
    edit_id: str
    request: EditRequest
    method: str
    gates: Gates  # the server's with the edit's own on top
    dry_run: bool = False  # computed, measured and gated alone, recorded 'checked', never installed


@dataclass
class Computed:
    """A batch's factors and measurements, with the weights they make, before anything is recorded."""

    update: BatchUpdate
    before: list[RequestMetrics]
    after: list[RequestMetrics]
    swap: WeightSwap
    gates: list[GateReport]
    gates_s: float
    started: float = field(default_factory=time.perf_counter)

    def metrics_after(self, j: int) -> dict:
        update = self.update
        return self.after[j].to_dict() | {
            "target_steps": update.steps[j], "target_nll": update.target_nll[j], "target_greedy": update.target_greedy[j],
            "gates": self.gates[j].results, "gates_s": round(self.gates_s, 4)}


@dataclass
class LoopState:
    """What the loop last said about itself; not_ready() reads it from the serving threads."""

    poll_s: float = 1.0
    beat: float | None = None  # time.monotonic() of its last sign of life
    busy: bool = False  # inside a batch: computing one may take minutes, so no beat is expected meanwhile
    problem: str | None = None  # the error it is retrying after; None once an iteration succeeds
    stopped: str | None = None  # why it no longer runs


class Worker:
    def __init__(
        self, editor: Editor, session_factory: Callable[[], Session], queue: OperationQueue, *,
        batch_size: int = 8, fault_injection: str | None = None, snapshot_path: Path | None = None,
        snapshot_every: int = 1000, max_attempts: int = 3, gates: Gates | None = None,
    ) -> None:
        self.editor = editor
        self.gates = server_gates() if gates is None else gates  # server-wide; None: the shipped defaults
        self.snapshot_path = snapshot_path  # the factor store's sums, so a restart need not re-sum the ledger
        self.snapshot_every = snapshot_every  # operations between snapshots while running
        self._unsnapshotted = 0
        self._snapshot_seq: int | None = None  # the seq of the snapshot on disk, when known
        self.sessions = session_factory
        self.queue = queue
        self.batch_size = batch_size
        self.fault_injection = fault_injection
        self.max_attempts = max_attempts  # claims of one operation before it is failed
        self.ready = threading.Event()
        self.last_apply_s: float | None = None
        self.loop = LoopState()
        self._last_error: str | None = None  # of the last failed loop iteration, until one succeeds
        self._unsure = False  # after an error: the weights may lag the ledger (see _catch_up)

    # ---- start-up ----------------------------------------------------------------------------

    def replay(self) -> int:
        """Rebuild the editor from the ledger and check the weights' digest: from the factor-store
        snapshot plus the operations after it when there is a valid one, else from every factor."""
        started = time.perf_counter()
        with self.sessions() as session:
            head_seq, _ = repo.head(session)
            digest = repo.head_digest(session)
        how = self._replay_from_snapshot(head_seq, digest)
        if how is None:
            self.editor.clear()
            how = self._replay_cold(head_seq, digest)
        if head_seq > 0 and self._snapshot_seq != head_seq:
            self._snapshot()
        log.info("replayed %d active edits (%s) to version %d in %.2f s",
                 len(self.editor.store), how, head_seq, time.perf_counter() - started)
        return len(self.editor.store)

    def _replay_cold(self, head_seq: int, digest: str | None) -> str:
        """Every active edit's factors read, checked against their checksums and the chain, summed."""
        with self.sessions() as session:
            verified, active = tensors.active_edits(session, self.editor.layers)
        self.editor.load(active, version=head_seq)
        if digest is not None and self.editor.weights_digest() != digest:
            raise LedgerCorrupt(
                f"replaying {len(active)} active edits does not reproduce the weights recorded at seq {head_seq}: "
                "the model, dtype or edited layers differ from those the ledger was written with"
            )
        return f"{verified} operations verified, all factors read"

    def _replay_from_snapshot(self, head_seq: int, digest: str | None) -> str | None:
        """The snapshot's sums, the chain verified over the recorded checksums, the operations after
        the snapshot applied with their (checked) factors; None if that does not reproduce the digest."""
        if self.snapshot_path is None or head_seq == 0:
            return None
        with self.sessions() as session:
            def accept(seq: int, chain_hash: str) -> bool:
                return seq <= head_seq and repo.op_hash(session, seq) == chain_hash

            seq = self.editor.restore_snapshot(self.snapshot_path, accept)
            if seq is None:
                return None
            self._snapshot_seq = seq
            verified = repo.verify_links(session)
            tail = tensors.ops_after(session, seq, self.editor.layers)
        self.editor.replay_ops(tail, head_seq)
        if digest is not None and self.editor.weights_digest() != digest:
            log.warning("the snapshot at seq %d and %d later operations do not reproduce the recorded weights; "
                        "replaying every factor instead", seq, len(tail))
            self._snapshot_seq = None  # so the replay's own snapshot replaces it
            return None
        return f"{verified} operations verified, snapshot at seq {seq} + {len(tail)} later operations"

    def _snapshot(self) -> None:
        if self.snapshot_path is None:
            return
        try:
            with self.sessions() as session:
                seq, chain_hash = repo.head(session)
            if seq != self.editor.version:
                return  # the ledger moved on since the weights were installed: next time
            self.editor.save_snapshot(self.snapshot_path, seq, chain_hash)
            self._unsnapshotted, self._snapshot_seq = 0, seq
        except Exception as exc:  # a missed snapshot costs the next start time, nothing else
            log.warning("could not write the factor-store snapshot %s: %s", self.snapshot_path, exc)

    def _ledger_factors(self, edit_id: str) -> EditFactors | None:
        """An applied edit's own factors, read back from the ledger (the editor keeps only sums)."""
        if edit_id not in self.editor.store:
            return None  # plan_revert says why
        with self.sessions() as session:
            return tensors.edit(session, edit_id, self.editor.layers)

    def recover_queue(self) -> int:
        """Re-publish unfinished operations missing from the queue (e.g. after Redis was flushed)."""
        with self.sessions() as session:
            seqs = repo.queued_operation_seqs(session)
        republished = self.queue.ensure(seqs)
        if republished:
            log.warning("re-enqueued %d operations missing from the queue", republished)
        return republished

    def start(self) -> None:
        self.replay()
        self.recover_queue()
        self.ready.set()

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Until `stop` is set: wait for messages (or poll), process every pending op, acknowledge.
        Any exception is logged and retried after a backoff that starts at poll_s."""
        loop = self.loop
        loop.poll_s, loop.stopped, loop.problem = poll_s, None, None
        backoff = poll_s
        try:
            while not stop.is_set():
                loop.beat = time.monotonic()
                try:
                    if self._unsure:
                        self._catch_up()
                    messages = self.queue.receive(timeout_s=poll_s)
                    loop.busy = True
                    while not stop.is_set() and self.process_next():
                        loop.beat = time.monotonic()
                    loop.busy = False
                    if messages:
                        self.queue.ack(messages)  # only now: their ops are durable in the ledger
                    backoff, loop.problem, self._last_error = poll_s, None, None
                except Exception as exc:  # the loop must outlive every failure: /ready reports it meanwhile
                    loop.busy, self._unsure = False, True
                    loop.problem = self._last_error = _reason(exc)
                    if isinstance(exc, Unavailable):  # the ledger or the queue is down: expected, no trace
                        log.error("%s; retrying in %.1f s", exc.message, backoff)
                    else:
                        log.exception("the worker loop failed; retrying in %.1f s", backoff)
                    loop.beat = time.monotonic()
                    stop.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
            if self._unsnapshotted:
                self._snapshot()
        finally:
            loop.busy = False
            loop.stopped = "the worker is shutting down" if stop.is_set() else "it ended on an error; see the log"

    def not_ready(self) -> str | None:
        """Why this worker cannot serve the ledger's model and apply edits now; None when it can."""
        if not self.ready.is_set():
            return "the model is loading or the worker is replaying the ledger"
        loop = self.loop
        if loop.stopped is not None:
            return f"the worker loop has stopped ({loop.stopped}): edits are not applied"
        if loop.problem is not None:
            return f"the worker is not applying edits; it is retrying after: {loop.problem}"
        if loop.beat is None:
            return "the worker loop has not started"
        silent = time.monotonic() - loop.beat
        if not loop.busy and silent > STALE_POLLS * loop.poll_s:
            return f"the worker loop has not run for {silent:.0f} s (it polls every {loop.poll_s:g} s): it is stuck"
        return None

    def _catch_up(self) -> None:
        """After an error, before anything else: the weights must be the ledger head's. A COMMIT that
        raised may still have committed (the connection dropped before its reply): its operations
        are then done in the ledger but missing from the weights, and are applied here."""
        with self.sessions() as session:
            head_seq, _ = repo.head(session)
            digest = repo.head_digest(session)
            missing = [] if head_seq == self.editor.version else \
                tensors.ops_after(session, self.editor.version, self.editor.layers)
        if missing:
            log.warning("the ledger recorded %d operations after version %d that the weights lack; applying them",
                        len(missing), self.editor.version)
            self.editor.replay_ops(missing, head_seq)
        if digest is not None and self.editor.served_digest() != digest:
            raise LedgerCorrupt(f"the served weights are not those the ledger recorded at seq {head_seq}; "
                                "restart the worker to replay the ledger")
        self._unsure = False

    def process_next(self) -> bool:
        """Take the next unit of work from the ledger; False when there is none."""
        batch_id = uuid.uuid4().hex
        with self.sessions() as session:
            ops = repo.next_operations(session, self.batch_size)
            if not ops:
                return False
            if ops[0].status == "applying":
                # Claimed before and never finished (an error, or the worker died): retried alone, so
                # that an operation that keeps failing cannot take its batch-mates down with it.
                ops = ops[:1]
            ops = _dry_runs_alone(session, ops)
            claimed = repo.mark_applying(session, ops, batch_id)
            session.commit()  # the attempt counts even if what follows fails or kills the worker
            exhausted = [op for op in claimed if (op.attempts or 0) > self.max_attempts]
            live = [op for op in claimed if op not in exhausted]
            jobs = [self._job(session, op) for op in live if op.kind == "apply"]
            rollbacks = [(op.seq, op.edit_id) for op in live if op.kind == "rollback"]
        for op in exhausted:
            why = f"the last failed with: {self._last_error}" if self._last_error else \
                "the worker stopped or failed while applying it each time (e.g. killed for memory); see its log"
            self._fail(op.seq, f"given up after {(op.attempts or 1) - 1} attempts; {why}")
        if rollbacks:
            self._rollback(*rollbacks[0])
        elif jobs:
            self._apply_batch(jobs, batch_id)
        self._unsnapshotted += len(claimed)
        if self._unsnapshotted >= self.snapshot_every:
            self._snapshot()
        return True

    def _job(self, session: Session, op) -> Job:
        edit = repo.get_edit(session, op.edit_id)
        own = Gates.from_dict(edit.request.get("gates"))
        return Job(op.seq, edit.id, EditRequest.from_dict(edit.request), edit.method, self.gates.merged(own),
                   _is_dry_run(edit.request))

    # ---- applying ----------------------------------------------------------------------------

    def _apply_batch(self, jobs: list[Job], batch_id: str) -> None:
        """Compute, record, install. A computation that fails (refused, or any error such as running
        out of memory) fails its edits, one by one for a batch; a failure while recording is the
        ledger's, and propagates to run(), which retries."""
        runnable = [job for job in jobs if self._method_ok(job)]
        if not runnable:
            return
        try:
            computed = self._compute(runnable, batch_id)
        except Exception as exc:
            if len(runnable) == 1:
                self._fail(runnable[0].seq, _reason(exc), exc)
                return
            log.warning("batch %s failed as a whole (%s); applying its %d edits one by one",
                        batch_id, _reason(exc), len(runnable))
            self._one_by_one(runnable, batch_id)
            return
        if len(runnable) > 1 and any(report.failed for report in computed.gates):
            # The gates measured the batch's joint update: a probe it broke cannot be pinned on one edit,
            # and the batch-mates' factors were solved together with the failing edit's. So nothing of
            # the batch is kept; each edit is computed and gated alone, and only its own gates decide it.
            log.warning("batch %s failed a quality gate; applying its %d edits one by one", batch_id, len(runnable))
            self._one_by_one(runnable, batch_id)
            return
        self._settle(runnable, computed, batch_id)

    def _one_by_one(self, jobs: list[Job], batch_id: str) -> None:
        for i, job in enumerate(jobs):
            single = f"{batch_id}-{i}"
            with self.sessions() as session:
                repo.rebatch(session, job.seq, single)
                session.commit()
            try:
                alone = self._compute([job], single)
            except Exception as single_exc:
                self._fail(job.seq, _reason(single_exc), single_exc)
            else:
                self._settle([job], alone, single)

    def _settle(self, jobs: list[Job], computed: Computed, batch_id: str) -> None:
        """Publish the computed weights, or (a dry run, or one edit that failed a gate) record them unserved."""
        if jobs[0].dry_run:  # always alone (_dry_runs_alone)
            self._check(jobs[0], computed)
        elif len(jobs) == 1 and computed.gates[0].failed:
            self._reject(jobs[0], computed)
        else:
            self._record(jobs, computed, batch_id)

    def _method_ok(self, job: Job) -> bool:
        if job.method == self.editor.method:
            return True
        self._fail(job.seq, f"this worker applies {self.editor.method} edits; method {job.method} is not enabled here")
        return False

    def _compute(self, jobs: list[Job], batch_id: str) -> Computed:
        """Everything that needs the model and not the ledger; the served weights stay as they are."""
        started = time.perf_counter()
        requests = [job.request for job in jobs]
        before = self.editor.measure(requests)
        update = self.editor.compute(requests, [job.edit_id for job in jobs], batch_id)
        after = self.editor.measure(requests, update.pending)
        gates_started = time.perf_counter()
        reports = self._gate(jobs, before, after, update)
        gates_s = time.perf_counter() - gates_started
        return Computed(update, before, after, self.editor.plan_commit(update), reports, gates_s, started)

    def _gate(self, jobs: list[Job], before: list[RequestMetrics], after: list[RequestMetrics],
              update: BatchUpdate) -> list[GateReport]:
        """Each job's gates, measured on the pending weights before anything serves them. Probe results
        are shared by the batch (one pending update), so each probe is scored once per weights."""
        held: dict[tuple[Probe, bool], bool] = {}

        def check(probes: Sequence[Probe], pending: bool) -> list[bool]:
            missing = list(dict.fromkeys(p for p in probes if (p, pending) not in held))
            if missing:
                results = self.editor.holds([(p.prompt, p.expected) for p in missing],
                                            update.pending if pending else None)
                held.update({(p, pending): ok for p, ok in zip(missing, results)})
            return [held[(p, pending)] for p in probes]

        return [evaluate(job.gates, job.request, before[j], after[j], check) for j, job in enumerate(jobs)]

    def _record(self, jobs: list[Job], computed: Computed, batch_id: str) -> None:
        update, before, swap = computed.update, computed.before, computed.swap
        self._maybe_crash("after_compute")
        version = max(job.seq for job in jobs)
        with self.sessions() as session:
            for j, job in enumerate(jobs):
                repo.record_applied(
                    session, job.seq, factors=tensors.to_stored(update.edits[j]), metrics_before=before[j].to_dict(),
                    metrics_after=computed.metrics_after(j),
                    update_norms=update.update_norms[j], layers=self.editor.layers,
                    weights_digest=swap.digest, model_version=version, settings=self.editor.settings(),
                )
            session.commit()
        self._maybe_crash("after_commit")
        self.editor.install(swap, version)
        self.last_apply_s = time.perf_counter() - computed.started
        for job in jobs:
            log.info("edit %s applied at version %d (batch %s of %d, %.2f s)",
                     job.edit_id, version, batch_id, len(jobs), self.last_apply_s)

    def _reject(self, job: Job, computed: Computed) -> None:
        """The edit failed a quality gate: recorded with its measurements, its weights never installed."""
        reason = computed.gates[0].reason()
        with self.sessions() as session:
            repo.record_rejected(session, job.seq, error=reason, metrics_before=computed.before[0].to_dict(),
                                 metrics_after=computed.metrics_after(0), settings=self.editor.settings())
            session.commit()
        log.warning("edit %s %s", job.edit_id, reason)

    def _check(self, job: Job, computed: Computed) -> None:
        """A dry run: recorded 'checked' with its measurements and gates; its weights are never installed.
        (They were still planned in _compute: an edit whose weights a real apply would refuse fails here too.)"""
        report = computed.gates[0]
        verdict = "dry run: a real edit would be " + (
            report.reason() if report.failed else "applied: it passed every quality gate; the model is unchanged")
        with self.sessions() as session:
            repo.record_checked(session, job.seq, verdict=verdict, metrics_before=computed.before[0].to_dict(),
                                metrics_after=computed.metrics_after(0), settings=self.editor.settings())
            session.commit()
        log.info("edit %s checked (%s)", job.edit_id, verdict)

    def _rollback(self, seq: int, edit_id: str) -> None:
        try:
            swap = self.editor.plan_revert(edit_id, self._ledger_factors(edit_id))
        except Unavailable:
            raise  # the ledger went away while its factors were read: retried, not the rollback's fault
        except Exception as exc:
            self._fail(seq, _reason(exc), exc)
            return
        self._maybe_crash("during_rollback")
        with self.sessions() as session:
            repo.record_rolled_back(session, seq, weights_digest=swap.digest, model_version=seq)
            session.commit()
        self._maybe_crash("after_commit")
        self.editor.install(swap, seq)
        log.info("edit %s rolled back at version %d", edit_id, seq)

    def _fail(self, seq: int, error: str, exc: Exception | None = None) -> None:
        with self.sessions() as session:
            repo.record_failed(session, seq, error=error)
            session.commit()
        # A refusal is explained by its message; anything else (a bug, out of memory) needs its trace.
        log.warning("operation %d failed: %s", seq, error,
                    exc_info=exc if exc is not None and not isinstance(exc, KnowpatchError) else None)

    def _maybe_crash(self, point: str) -> None:
        """Testing knob (KNOWPATCH_FAULT_INJECTION): die here as a SIGKILL would."""
        if self.fault_injection == point:
            log.error("fault injection: killing the worker %s", point.replace("_", " "))
            os.kill(os.getpid(), signal.SIGKILL)


def _is_dry_run(request: dict[str, Any]) -> bool:
    return request.get("dry_run") is True  # service.edits.NewEdit.stored writes it only when set


def _dry_runs_alone(session: Session, ops: list[Operation]) -> list[Operation]:
    """Cut a batch so that a dry run is computed alone, as a real edit submitted alone would be: a joint
    solve with other edits would give it other factors and measurements (and change its batch-mates').
    A dry run at the head comes alone; otherwise the batch ends before the first dry run."""
    dry = [op.kind == "apply" and _is_dry_run(repo.get_edit(session, op.edit_id).request) for op in ops]
    if not ops or dry[0]:
        return ops[:1]
    return ops[: dry.index(True)] if True in dry else ops


def _reason(exc: BaseException) -> str:
    """An error as the ledger and /ready show it."""
    return exc.message if isinstance(exc, KnowpatchError) else f"{type(exc).__name__}: {exc}"
