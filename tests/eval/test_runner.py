"""The sequential protocol on a model-free backend: order, checkpoints, failures, the report."""
from __future__ import annotations

import json

from service.eval.data import load_cases, load_heldout, load_knowns
from service.eval.report import load_run, metrics_table, write_comparison, write_run
from service.eval.runner import EvalInputs, ProtocolSettings, run_protocol

from .fakes import FakeBackend


def _inputs(n: int) -> EvalInputs:
    return EvalInputs(load_cases("counterfact", n=n).cases, load_knowns(count=5), load_heldout(chunks=2))


def test_protocol_scores_baseline_then_edits_in_order_with_checkpoints():
    backend = FakeBackend()
    results = run_protocol(backend, _inputs(10), ProtocolSettings("counterfact", batch_size=3, checkpoint_every=4),
                           progress=False)
    assert backend.applied_batches == ["eval-00000", "eval-00001", "eval-00002", "eval-00003"]
    assert [b["first_case"] for b in results["batches"]] == [0, 3, 6, 9]
    # checkpoints after the first batch boundary at or past 4 and 8 edits; the last one is the final model
    assert [(c["edits"], c["cases"]) for c in results["checkpoints"]] == [(0, 10), (6, 6), (9, 9), (10, 10)]
    assert results["baseline"]["efficacy"] == 0.0 and results["final"]["efficacy"] == 100.0
    assert results["baseline"]["control_retained"] == 100.0
    assert results["final"]["fluency"] > 0 and "fluency" not in results["checkpoints"][1]
    assert results["edits_applied"] == 10 and results["edits_failed"] == 0
    assert len(results["case_results"]["final"]["cases"]) == 10
    assert set(results["timings"]) >= {"baseline_eval_s", "editing_s", "checkpoint_eval_s", "final_eval_s"}


def test_a_failed_batch_is_recorded_and_its_cases_still_scored():
    results = run_protocol(FakeBackend(fail_batches=["eval-00001"]), _inputs(4),
                           ProtocolSettings("counterfact", batch_size=2), progress=False)
    assert [b["applied"] for b in results["batches"]] == [True, False]
    assert results["batches"][1]["error"] == "refused"
    assert results["edits_applied"] == 2 and results["final"]["efficacy"] == 50.0


def test_reports_of_one_run_and_a_comparison(tmp_path):
    runs = []
    for method in ("alphaedit", "memit"):
        results = run_protocol(FakeBackend(), _inputs(4), ProtocolSettings("counterfact", 2, 2), progress=False)
        results["config"] = {"dataset": "counterfact", "method": method, "model": "fake", "n": 4, "batch_size": 2}
        results["timings"]["total_s"] = 1.0
        written = write_run(results, tmp_path / method)
        assert all(p.is_file() and p.stat().st_size > 0 for p in written)
        runs.append(tmp_path / method)
    saved = json.loads((tmp_path / "memit" / "results.json").read_text())
    assert "case_results" not in saved and saved["final"]["efficacy"] == 100.0
    table = metrics_table([load_run(p) for p in runs])
    assert table.count("unedited") == 1 and "| alphaedit | 4 |" in table and "| memit | 4 |" in table
    written = write_comparison(runs, tmp_path / "compare")
    assert [p.name for p in written] == ["comparison.md", "curves.png", "perplexity.png"]
    assert (tmp_path / "compare" / "curves.png").read_bytes()[:4] == b"\x89PNG"
