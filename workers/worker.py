"""The worker: applies ledger operations in order to the editor's model, and replays at start-up.

Per batch: claim ops (commit) -> compute factors with no session open -> record them in the
ledger (one commit) -> swap the weights in. A crash before the ledger commit leaves the ops
claimed ('applying'), and they are taken again; a crash after it is repaired by the replay.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.orm import Session

from service.engine.editor import BatchUpdate, Editor
from service.engine.factors import EditFactors, LayerFactor
from service.engine.types import EditRequest
from service.errors import KnowpatchError, LedgerCorrupt, Unavailable
from service.ledger import repository as repo
from service.ledger.codec import StoredFactor
from service.queue.base import OperationQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A claimed apply operation, as plain data (no session is open while computing)."""

    seq: int
    edit_id: str
    request: EditRequest
    method: str


class Worker:
    def __init__(
        self, editor: Editor, session_factory: Callable[[], Session], queue: OperationQueue, *,
        batch_size: int = 8, fault_injection: str | None = None, snapshot_path: Path | None = None,
        snapshot_every: int = 1000,
    ) -> None:
        self.editor = editor
        self.snapshot_path = snapshot_path  # the factor store's sums, so a restart need not re-sum the ledger
        self.snapshot_every = snapshot_every  # operations between snapshots while running
        self._unsnapshotted = 0
        self._snapshot_seq: int | None = None  # the seq of the snapshot on disk, when known
        self.sessions = session_factory
        self.queue = queue
        self.batch_size = batch_size
        self.fault_injection = fault_injection
        self.ready = threading.Event()
        self.last_apply_s: float | None = None

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
            verified, active = repo.verified_active_edits(session)
        self.editor.load([self._edit_factors(a.edit_id, a.batch_id, a.factors) for a in active], version=head_seq)
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
            tail = [(kind, self._edit_factors(edit_id, batch_id or "", repo.verified_factors(session, edit_id)))
                    for _, kind, edit_id, batch_id in repo.done_after(session, seq)]
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
        except (OSError, KnowpatchError) as exc:  # a missed snapshot costs the next start time, nothing else
            log.warning("could not write the factor-store snapshot %s: %s", self.snapshot_path, exc)

    def _edit_factors(self, edit_id: str, batch_id: str, factors: list[StoredFactor]) -> EditFactors:
        layers = {f.layer: LayerFactor(*(torch.from_numpy(np.asarray(x)) for x in (f.r, f.a, f.k))) for f in factors}
        if sorted(layers) != sorted(self.editor.layers):
            raise LedgerCorrupt(
                f"edit {edit_id} touches layers {sorted(layers)} but this worker edits {self.editor.layers}"
            )
        return EditFactors(edit_id, batch_id, layers)

    def _ledger_factors(self, edit_id: str) -> EditFactors | None:
        """An applied edit's own factors, read back from the ledger (the editor keeps only sums)."""
        if edit_id not in self.editor.store:
            return None  # plan_revert says why
        with self.sessions() as session:
            edit = repo.get_edit(session, edit_id)
            stored = repo.verified_factors(session, edit_id)
            batch_id = edit.batch_id or ""
        return self._edit_factors(edit_id, batch_id, stored)

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
        """Until `stop` is set: wait for messages (or poll), process every pending op, acknowledge."""
        backoff = 1.0
        while not stop.is_set():
            try:
                messages = self.queue.receive(timeout_s=poll_s)
                while not stop.is_set() and self.process_next():
                    pass
                if messages:
                    self.queue.ack(messages)  # only now: their ops are durable in the ledger
                backoff = 1.0
            except Unavailable as exc:
                log.error("%s; retrying in %.0f s", exc.message, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        if self._unsnapshotted:
            self._snapshot()

    def process_next(self) -> bool:
        """Take the next unit of work from the ledger; False when there is none."""
        batch_id = uuid.uuid4().hex
        with self.sessions() as session:
            ops = repo.next_operations(session, self.batch_size)
            if not ops:
                return False
            claimed = repo.mark_applying(session, ops, batch_id)
            jobs = [self._job(session, op) for op in claimed if op.kind == "apply"]
            rollbacks = [(op.seq, op.edit_id) for op in claimed if op.kind == "rollback"]
            session.commit()
        if rollbacks:
            self._rollback(*rollbacks[0])
        elif jobs:
            self._apply_batch(jobs, batch_id)
        self._unsnapshotted += len(claimed)
        if self._unsnapshotted >= self.snapshot_every:
            self._snapshot()
        return True

    @staticmethod
    def _job(session: Session, op) -> Job:
        edit = repo.get_edit(session, op.edit_id)
        return Job(op.seq, edit.id, EditRequest.from_dict(edit.request), edit.method)

    # ---- applying ----------------------------------------------------------------------------

    def _apply_batch(self, jobs: list[Job], batch_id: str) -> None:
        runnable = [job for job in jobs if self._method_ok(job)]
        if not runnable:
            return
        try:
            self._apply(runnable, batch_id)
        except KnowpatchError as exc:
            if len(runnable) == 1:
                self._fail(runnable[0].seq, exc.message)
                return
            log.warning("batch %s failed as a whole (%s); applying its %d edits one by one",
                        batch_id, exc.message, len(runnable))
            for i, job in enumerate(runnable):
                single = f"{batch_id}-{i}"
                with self.sessions() as session:
                    repo.rebatch(session, job.seq, single)
                    session.commit()
                try:
                    self._apply([job], single)
                except KnowpatchError as single_exc:
                    self._fail(job.seq, single_exc.message)

    def _method_ok(self, job: Job) -> bool:
        if job.method == self.editor.method:
            return True
        self._fail(job.seq, f"this worker applies {self.editor.method} edits; method {job.method} is not enabled here")
        return False

    def _apply(self, jobs: list[Job], batch_id: str) -> None:
        started = time.perf_counter()
        requests = [job.request for job in jobs]
        before = self.editor.measure(requests)
        update = self.editor.compute(requests, [job.edit_id for job in jobs], batch_id)
        after = self.editor.measure(requests, update.pending)
        swap = self.editor.plan_commit(update)
        self._maybe_crash("after_compute")
        version = max(job.seq for job in jobs)
        with self.sessions() as session:
            for j, job in enumerate(jobs):
                repo.record_applied(
                    session, job.seq, factors=_stored(update, j), metrics_before=before[j].to_dict(),
                    metrics_after=after[j].to_dict() | {"target_steps": update.steps[j], "target_nll": update.target_nll[j],
                                                        "target_greedy": update.target_greedy[j]},
                    update_norms=update.update_norms[j], layers=self.editor.layers,
                    weights_digest=swap.digest, model_version=version, settings=self.editor.settings(),
                )
            session.commit()
        self._maybe_crash("after_commit")
        self.editor.install(swap, version)
        self.last_apply_s = time.perf_counter() - started
        for job in jobs:
            log.info("edit %s applied at version %d (batch %s of %d, %.2f s)",
                     job.edit_id, version, batch_id, len(jobs), self.last_apply_s)

    def _rollback(self, seq: int, edit_id: str) -> None:
        try:
            swap = self.editor.plan_revert(edit_id, self._ledger_factors(edit_id))
        except KnowpatchError as exc:
            self._fail(seq, exc.message)
            return
        with self.sessions() as session:
            repo.record_rolled_back(session, seq, weights_digest=swap.digest, model_version=seq)
            session.commit()
        self._maybe_crash("after_commit")
        self.editor.install(swap, seq)
        log.info("edit %s rolled back at version %d", edit_id, seq)

    def _fail(self, seq: int, error: str) -> None:
        with self.sessions() as session:
            repo.record_failed(session, seq, error=error)
            session.commit()
        log.warning("operation %d failed: %s", seq, error)

    def _maybe_crash(self, point: str) -> None:
        """Testing knob (KNOWPATCH_FAULT_INJECTION): die here as a SIGKILL would."""
        if self.fault_injection == point:
            log.error("fault injection: killing the worker %s", point.replace("_", " "))
            os.kill(os.getpid(), signal.SIGKILL)


def _stored(update: BatchUpdate, j: int) -> list[StoredFactor]:
    edit = update.edits[j]
    return [
        StoredFactor(layer, f.r.numpy(), f.a.numpy(), f.k.numpy()) for layer, f in sorted(edit.layers.items())
    ]
