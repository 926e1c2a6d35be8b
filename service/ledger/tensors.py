"""The ledger's factors as the engine's tensors and back: the one place a stored factor becomes
weights, used by the worker (record, replay, catch-up, rollback), the export and the benchmarks.
Separate from codec.py because it imports torch, which the API process (split deployment) never loads."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sqlalchemy.orm import Session

from service.engine.factors import EditFactors, LayerFactor
from service.errors import LedgerCorrupt
from service.ledger import repository as repo
from service.ledger.codec import StoredFactor


def to_engine(edit_id: str, batch_id: str, stored: Sequence[StoredFactor], layers: Sequence[int]) -> EditFactors:
    """Ledger factors as the engine's, checked to touch exactly the editor's layers."""
    by_layer = {f.layer: LayerFactor(*(torch.from_numpy(np.asarray(x)) for x in (f.r, f.a, f.k))) for f in stored}
    if sorted(by_layer) != sorted(layers):
        raise LedgerCorrupt(f"edit {edit_id} touches layers {sorted(by_layer)} but this model edits {sorted(layers)}")
    return EditFactors(edit_id, batch_id, by_layer)


def to_stored(edit: EditFactors) -> list[StoredFactor]:
    """The engine's factors of one edit as the ledger stores them, layer by layer."""
    return [StoredFactor(layer, f.r.numpy(), f.a.numpy(), f.k.numpy()) for layer, f in sorted(edit.layers.items())]


def edit(session: Session, edit_id: str, layers: Sequence[int]) -> EditFactors:
    """One edit's factors, each checked against its checksum as it is read."""
    row = repo.get_edit(session, edit_id)
    return to_engine(edit_id, row.batch_id or "", repo.verified_factors(session, edit_id), layers)


def active_edits(session: Session, layers: Sequence[int]) -> tuple[int, list[EditFactors]]:
    """(operations whose chain links verified, every active edit's factors) for a cold replay."""
    verified, active = repo.verified_active_edits(session)
    return verified, [to_engine(a.edit_id, a.batch_id, a.factors, layers) for a in active]


def ops_after(session: Session, seq: int, layers: Sequence[int]) -> list[tuple[str, EditFactors]]:
    """The done operations after `seq`, in order, as ("apply" | "rollback", the edit's factors), each
    factor checked against its checksum as it is read."""
    return [(kind, to_engine(edit_id, batch_id or "", repo.verified_factors(session, edit_id), layers))
            for _, kind, edit_id, batch_id in repo.done_after(session, seq)]
