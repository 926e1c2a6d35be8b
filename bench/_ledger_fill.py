"""Helper of bench/service_load.py: fill fresh SQLite ledgers with SYNTHETIC applied edits.

Applying 1000 real edits takes about an hour on a 2-core CPU, so the restart benchmark replays
ledgers made here instead: random rank-one factors of the right shapes and small norms (the update
direction `a` projected onto the layer's null space, as AlphaEdit's are), written through the real
repository functions (create_edits -> mark_applying -> record_applied), batch by batch, each op of a
batch carrying the batch id and the weights digest of the state after that batch, computed by a real
Editor built from the same settings as the service (KNOWPATCH_* environment). The worker's replay
then verifies the hash chain and the digest exactly as it does for real edits.

    .venv/bin/python bench/_ledger_fill.py --ledger /tmp/x/l100:100 --ledger /tmp/x/l1000:1000 [--batch 8]

Each --ledger is DATA_DIR:N; the ledger is DATA_DIR/ledger.db (what KNOWPATCH_DATA_DIR=DATA_DIR
serves) and must not exist yet. Prints one JSON line per ledger.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from service.bootstrap import build_editor  # noqa: E402
from service.config import Settings  # noqa: E402
from service.engine.editor import Editor  # noqa: E402
from service.engine.factors import on_grid  # noqa: E402
from service.ledger import repository as repo  # noqa: E402
from service.ledger.codec import StoredFactor  # noqa: E402
from service.ledger.db import make_engine, migrate, session_factory  # noqa: E402
from service.ledger.models import Operation  # noqa: E402
from service.ledger.tensors import to_engine  # noqa: E402

REQUESTED_BY = "bench-synthetic"


def _factor(editor: Editor, layer: int, rng: np.random.Generator) -> StoredFactor:
    """A random rank-one update of `layer`, ||r aᵀ|| about 1e-3, `a` in the layer's null space."""
    d_out, d_in = editor.adapter.weight(layer).shape
    r = rng.standard_normal(d_out).astype(np.float32) * np.float32(1e-3 / np.sqrt(d_out))
    g = torch.from_numpy(rng.standard_normal(d_in)).double()
    basis = editor.null_spaces[layer].basis
    if basis is not None and editor.method == "alphaedit":
        g = basis.double().cpu() @ (basis.double().cpu().T @ g)
    a = (g / g.norm().clamp_min(1e-12)).float()
    r_grid, a_grid = on_grid(torch.from_numpy(r), a)  # as the editor records real factors
    k = rng.standard_normal(d_in).astype(np.float32)  # a key-like vector (only C_p uses it)
    return StoredFactor(layer, r_grid.numpy(), a_grid.numpy(), k)


def fill(editor: Editor, data_dir: Path, n: int, batch: int, seed: int) -> dict:
    """Create DATA_DIR/ledger.db with n synthetic applied edits; the editor ends up holding them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / "ledger.db"
    if db.exists():
        raise SystemExit(f"{db} exists already; the synthetic ledger must be fresh")
    url = f"sqlite:///{db.resolve()}"
    migrate(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    digest = None
    version = 0
    try:
        for start in range(0, n, batch):
            size = min(batch, n - start)
            batch_id = uuid.uuid4().hex
            requests = [{"subject": f"Synthetic subject {start + j}",
                         "prompt": f"Synthetic subject {start + j} is located in",
                         "target_new": "Nowhere", "target_true": None,
                         "rephrase_prompts": [], "locality_prompts": [],
                         "metadata": {"synthetic": True, "bench": "service_load"}} for j in range(size)]
            with sessions() as session:
                edits, _ = repo.create_edits(session, requests, subjects=[r["subject"] for r in requests],
                                          requested_by=REQUESTED_BY, method=editor.method, idempotency_key=None)
                ops = [session.get(Operation, int(e.seq)) for e in edits]
                claimed = repo.mark_applying(session, ops, batch_id)
                if len(claimed) != size:
                    raise RuntimeError(f"claimed {len(claimed)} of {size} synthetic operations")
                stored = {e.id: [_factor(editor, layer, rng) for layer in editor.layers] for e in edits}
                # the weights after this batch, composed by the real factor store, exactly as replay does
                version = max(int(e.seq) for e in edits)
                editor.load([to_engine(e.id, batch_id, stored[e.id], editor.layers) for e in edits], version)
                digest = editor.weights_digest()
                for e, op in zip(edits, claimed):
                    factors = stored[e.id]
                    repo.record_applied(
                        session, op, factors=factors, metrics_before=None,
                        metrics_after={"synthetic": True},
                        update_norms={f.layer: float(np.linalg.norm(f.r) * np.linalg.norm(f.a)) for f in factors},
                        layers=list(editor.layers), weights_digest=digest, model_version=version,
                    )
                session.commit()
        with sessions() as session:
            verified = repo.verify_chain(session)
            active = len(repo.active_edits(session))
            head_seq, _ = repo.head(session)
            head_digest = repo.head_digest(session)
    finally:
        engine.dispose()
    if head_digest != digest or active != n:
        raise RuntimeError(f"synthetic ledger check failed: {active} active of {n}, digest {head_digest} != {digest}")
    return {"data_dir": str(data_dir), "edits": n, "batch": batch, "operations_verified": verified,
            "head_seq": head_seq, "weights_digest": digest, "fill_s": round(time.perf_counter() - started, 2),
            "db_bytes": db.stat().st_size, "synthetic": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ledger", action="append", required=True, help="DATA_DIR:N (repeatable)")
    parser.add_argument("--batch", type=int, default=8, help="edits per synthetic batch (shared batch id)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    targets = []
    for spec in args.ledger:
        where, _, count = spec.rpartition(":")
        if not where or not count.isdigit():
            raise SystemExit(f"--ledger wants DATA_DIR:N, got {spec!r}")
        targets.append((Path(where), int(count)))
    settings = Settings()
    for i, (data_dir, n) in enumerate(targets):
        # A fresh editor per ledger: each ledger is replayed onto the base weights by its own service.
        editor = build_editor(settings, progress=False)
        try:
            print(json.dumps(fill(editor, data_dir, n, args.batch, args.seed + i)), flush=True)
        finally:
            editor.close()


if __name__ == "__main__":
    main()
