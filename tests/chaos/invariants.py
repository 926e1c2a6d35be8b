"""What must hold once a fresh worker has caught up after a fault, read from the ledger itself:

- every accepted edit is in the ledger and applied, rolled back, cancelled, failed with a reason, or
  still queued; every accepted rollback is done or failed with a reason; nothing is left 'applying';
- nothing happened twice: one apply operation per edit, at most one done rollback, at most one
  'applied' and one 'rolled_back' event, factor rows exactly for the edits whose apply is done, an
  Idempotency-Key retry answered with the first request's edits, and a request sent again with its key
  after a 503 or a dropped connection answered with exactly the edits the ledger holds under that key;
- each edit's status is the one its operations imply;
- the hash chain verifies (every link and every factor checksum);
- the served weights are the ledger's: the worker's digest and version equal the ledger head's, and
  a replay of every factor from scratch reproduces that digest bit for bit.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.errors import KnowpatchError
from service.ledger import repository as repo
from service.ledger.models import Edit, EditEvent, EditFactor, IdempotencyKey, Operation
from tests.chaos.workload import Accepted

PENDING = ("queued", "applying")


@dataclass
class Findings:
    lost: list[str] = field(default_factory=list)  # accepted, then missing or unaccounted for
    duplicated: list[str] = field(default_factory=list)  # applied (or rolled back, or created) twice
    inconsistent: list[str] = field(default_factory=list)  # statuses, reasons or factors that do not add up
    weight_mismatches: list[str] = field(default_factory=list)
    recovery: list[str] = field(default_factory=list)  # a process that died or stayed unready, work left pending
    statuses: Counter = field(default_factory=Counter)  # of the accepted edits, at the end
    chain_length: int = 0

    @property
    def problems(self) -> list[str]:
        return [f"lost: {x}" for x in self.lost] + [f"duplicated: {x}" for x in self.duplicated] + \
            [f"inconsistent: {x}" for x in self.inconsistent] + [f"weights: {x}" for x in self.weight_mismatches] + \
            [f"recovery: {x}" for x in self.recovery]


def pending_operations(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return repo.queue_depth(session)


# Edit statuses whose apply operation is 'failed': a failure, a quality gate's rejection, a dry run.
UNSERVED = ("failed", "rejected", "checked")


def _expected_status(apply: Operation, rollbacks: list[Operation], status: str) -> str:
    if apply.status == "done":
        return "rolled_back" if any(op.status == "done" for op in rollbacks) else "applied"
    if apply.status == "failed":
        return status if status in UNSERVED else "failed"
    return apply.status


def _check_edit(edit: Edit, ops: list[Operation], events: list[EditEvent], factor_rows: int, layers: int,
                findings: Findings) -> None:
    applies = [op for op in ops if op.kind == "apply"]
    rollbacks = [op for op in ops if op.kind == "rollback"]
    names = Counter(e.event for e in events)
    if len(applies) != 1:
        findings.duplicated.append(f"edit {edit.id} has {len(applies)} apply operations")
        return
    if sum(op.status == "done" for op in rollbacks) > 1 or names["applied"] > 1 or names["rolled_back"] > 1:
        findings.duplicated.append(f"edit {edit.id}: events {dict(names)}, rollbacks "
                                   f"{[(op.seq, op.status) for op in rollbacks]}")
    expected = _expected_status(applies[0], rollbacks, edit.status)
    if edit.status != expected:
        findings.inconsistent.append(f"edit {edit.id} is {edit.status} but its operations say {expected}")
    if edit.status in PENDING or any(op.status in PENDING for op in ops):
        findings.inconsistent.append(f"edit {edit.id} still has work pending after the catch-up ({edit.status})")
    if edit.status == "failed" and not (edit.error or "").strip():
        findings.inconsistent.append(f"edit {edit.id} failed without a reason")
    failed_rollbacks = sum(op.status == "failed" for op in rollbacks)
    rollback_reasons = sum(e.event == "failed" and (e.reason or "").startswith("rollback failed") for e in events)
    if failed_rollbacks != rollback_reasons:
        findings.inconsistent.append(f"edit {edit.id}: {failed_rollbacks} failed rollbacks, {rollback_reasons} reasons")
    wanted_rows = layers if applies[0].status == "done" else 0
    if factor_rows != wanted_rows:
        findings.inconsistent.append(f"edit {edit.id} ({edit.status}) has {factor_rows} factor rows, not {wanted_rows}")


def check_ledger(sessions: sessionmaker[Session], accepted: Accepted, layers: int) -> Findings:
    """The ledger-wide invariants, and what became of everything `accepted` holds."""
    findings = Findings()
    with sessions() as session:
        try:
            findings.chain_length = repo.verify_chain(session)
        except KnowpatchError as exc:
            findings.inconsistent.append(f"the hash chain does not verify: {exc.message}")
        edits = {e.id: e for e in session.scalars(select(Edit))}
        ops: dict[str, list[Operation]] = defaultdict(list)
        for op in session.scalars(select(Operation).order_by(Operation.seq)):
            ops[op.edit_id].append(op)
        events: dict[str, list[EditEvent]] = defaultdict(list)
        for event in session.scalars(select(EditEvent).order_by(EditEvent.id)):
            events[event.edit_id].append(event)
        rows = dict(session.execute(select(EditFactor.edit_id, func.count()).group_by(EditFactor.edit_id)).all())
        for edit in edits.values():
            _check_edit(edit, ops[edit.id], events[edit.id], int(rows.get(edit.id, 0)), layers, findings)
        _check_accepted(session, accepted, edits, ops, findings)
    return findings


def _check_accepted(session: Session, accepted: Accepted, edits: dict[str, Edit], ops: dict[str, list[Operation]],
                    findings: Findings) -> None:
    for edit_id in accepted.edits:
        edit = edits.get(edit_id)
        if edit is None:
            findings.lost.append(f"edit {edit_id} was accepted (202) but is not in the ledger")
            continue
        findings.statuses[edit.status] += 1
    for edit_id, seq in accepted.rollbacks:
        op = next((o for o in ops.get(edit_id, []) if o.seq == seq and o.kind == "rollback"), None)
        if op is None:
            findings.lost.append(f"rollback {seq} of edit {edit_id} was accepted (202) but is not in the ledger")
        elif op.status not in ("done", "failed", *PENDING):
            findings.inconsistent.append(f"rollback {seq} of edit {edit_id} is {op.status}")
    for edit_id in accepted.cancels:
        status = edits[edit_id].status if edit_id in edits else "missing"
        if status != "cancelled":
            findings.inconsistent.append(f"edit {edit_id} was cancelled (200) but is {status}")
    for first, again in accepted.retries:
        if first != again:
            findings.duplicated.append(f"an Idempotency-Key retry created edits {again}, the first request {first}")
    for requester, key, ids in accepted.keyed:
        row = session.get(IdempotencyKey, (requester, key))
        if row is None or list(row.edit_ids) != ids:
            findings.duplicated.append(f"Idempotency-Key {key} was answered with edits {ids}, but the ledger holds "
                                       f"{None if row is None else row.edit_ids} under it")


@dataclass(frozen=True)
class ServedState:
    version: int | None
    digest: str | None


def check_weights(sessions: sessionmaker[Session], served: ServedState, replayed: ServedState,
                  findings: Findings) -> None:
    """The served weights and a from-scratch replay, against the ledger head."""
    with sessions() as session:
        head_seq, _ = repo.head(session)
        head = ServedState(head_seq, repo.head_digest(session))
    wanted = head.digest or replayed.digest  # an empty ledger records no digest: the base weights'
    for name, state in (("the worker serves", served), ("a replay from scratch gives", replayed)):
        if state.version != head.version or state.digest != wanted:
            findings.weight_mismatches.append(f"{name} version {state.version} digest {state.digest}; the ledger "
                                              f"head is version {head.version} digest {head.digest}")
