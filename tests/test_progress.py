"""service.progress: phases, done/total and an ETA from the rate so far."""
from __future__ import annotations

from service import progress as progress_module
from service.progress import Progress


def test_eta_follows_the_rate_so_far(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    tracker = Progress(log_interval_s=1e9, settle_s=0)
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


def test_a_burst_is_timed_once_it_has_been_taken_in(monkeypatch, caplog):
    """The self corpus: a minute generating 12k tokens, then the statistics take them 2k at a time."""
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    tracker = Progress(log_interval_s=10, settle_s=3)
    tracker.phase("key statistics", 20000, "tokens")
    caplog.set_level("INFO", logger="knowpatch.progress")
    now[0] = 60.0
    tracker.advance(2000)  # 9x too slow a rate: 60 s for 2k
    assert tracker.snapshot()["eta_s"] is None and "left" not in caplog.text
    for _ in range(5):
        now[0] += 0.7
        tracker.advance(2000)
    assert tracker.snapshot()["done"] == 12000 and tracker.snapshot()["eta_s"] == round(8000 * 63.5 / 12000, 1)
    assert "12000/20000 tokens, 63.5 s in, about 42.3 s left" in caplog.text  # logged once settled
