"""service.progress: phases, done/total and an ETA from the rate so far."""
from __future__ import annotations

from service import progress as progress_module
from service.progress import Progress


def test_eta_follows_the_rate_so_far(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    tracker = Progress(log_interval_s=1e9)
    assert tracker.snapshot() == {} and tracker.describe() == "starting"
    tracker.phase("key statistics", 1000, "tokens")
    assert tracker.snapshot()["eta_s"] is None  # nothing done yet: no rate
    now[0] += 10
    tracker.advance(250)
    snap = tracker.snapshot()
    assert snap["phase"] == "key statistics" and snap["done"] == 250 and snap["total"] == 1000
    assert snap["elapsed_s"] == 10 and snap["eta_s"] == 30  # 750 more at 25 tokens/s
    assert tracker.describe() == "key statistics: 250/1000 tokens, 10 s in, about 30 s left"
    tracker.phase("replaying the ledger")
    assert tracker.snapshot()["total"] is None and tracker.describe() == "replaying the ledger, 0 s in"
