"""The ledger's factors as the engine's: shared by the worker's replay and catch-up, the export and
the benchmarks, so a stored factor is turned into weights one way only."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sqlalchemy.orm import Session

from service.engine.factors import EditFactors, LayerFactor
from service.errors import LedgerCorrupt
from service.ledger import repository as repo
from service.ledger.codec import StoredFactor


def edit_factors(edit_id: str, batch_id: str, stored: Sequence[StoredFactor], layers: Sequence[int]) -> EditFactors:
    """Ledger factors as the engine's, checked to touch exactly the editor's layers."""
    by_layer = {f.layer: LayerFactor(*(torch.from_numpy(np.asarray(x)) for x in (f.r, f.a, f.k))) for f in stored}
    if sorted(by_layer) != sorted(layers):
        raise LedgerCorrupt(f"edit {edit_id} touches layers {sorted(by_layer)} but this model edits {sorted(layers)}")
    return EditFactors(edit_id, batch_id, by_layer)


def stored_factors(edit: EditFactors) -> list[StoredFactor]:
    """The engine's factors of one edit as the ledger stores them, layer by layer."""
    return [StoredFactor(layer, f.r.numpy(), f.a.numpy(), f.k.numpy()) for layer, f in sorted(edit.layers.items())]


def ops_after(session: Session, seq: int, layers: Sequence[int]) -> list[tuple[str, EditFactors]]:
    """The done operations after `seq`, in order, as ("apply" | "rollback", the edit's factors), each
    factor checked against its checksum as it is read."""
    return [(kind, edit_factors(edit_id, batch_id or "", repo.verified_factors(session, edit_id), layers))
            for _, kind, edit_id, batch_id in repo.done_after(session, seq)]
