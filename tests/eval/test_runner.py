"""The sequential protocol on the evaluation's real in-process target (a tiny random Llama):
order, checkpoints, a batch the engine refuses, and the reports written from the results."""
from __future__ import annotations

import json

from service.engine.editor import Editor
from evaluation import metrics
from evaluation.data import load_cases, load_heldout, load_knowns
from evaluation.targets.engine import EngineTarget
from evaluation.report import load_run, metrics_table, write_comparison, write_run
from evaluation.runner import EvalInputs, ProtocolSettings, run_protocol
from tests.conftest import shared_data

from .conftest import MakeTarget

RATES = ["efficacy", "generalisation", "specificity", "efficacy_top1", "generalisation_top1", "specificity_top1",
         "control_retained", "control_top1"]


def _inputs(n: int) -> EvalInputs:
    return EvalInputs(load_cases("counterfact", shared_data("counterfact"), n=n).cases,
                      load_knowns(shared_data("knowns"), count=5), load_heldout(shared_data("wikitext"), chunks=2))


def _settings(batch_size: int, checkpoint_every: int | None = None) -> ProtocolSettings:
    return ProtocolSettings("counterfact", batch_size, checkpoint_every, fluency_tokens=20)


def test_protocol_scores_baseline_then_edits_in_order_with_checkpoints(target: EngineTarget, editor: Editor):
    inputs = _inputs(10)
    unedited, _ = metrics.counterfact_metrics(target, inputs.cases)
    digest = editor.weights_digest()
    results = run_protocol(target, inputs, _settings(batch_size=3, checkpoint_every=4), progress=False)

    # every batch applied, in order, each as the next model version
    sizes = [3, 3, 3, 1]
    assert editor.store.edit_ids == [f"eval-{b:05d}-{j}" for b, size in enumerate(sizes) for j in range(size)]
    batches = results["batches"]
    assert [(b["index"], b["first_case"], b["size"], b["model_version"]) for b in batches] == [
        (0, 0, 3, 1), (1, 3, 3, 2), (2, 6, 3, 3), (3, 9, 1, 4)]
    assert all(b["applied"] and b["error"] is None for b in batches) and editor.version == 4
    assert [len(b["steps"]) for b in batches] == [len(b["target_nll"]) for b in batches] == sizes
    assert all(b["steps_mean"] > 0 and b["target_nll_mean"] > 0 and b["seconds"] > 0 for b in batches)
    assert all(b["timings"]["targets_s"] > 0 and "commit_s" in b["timings"] for b in batches)
    assert results["edits_applied"] == 10 and results["edits_failed"] == 0 and editor.weights_digest() != digest

    # checkpoints after the first batch boundary at or past 4 and 8 edits score the cases edited so far;
    # the first is the baseline, the last the final model
    checkpoints = results["checkpoints"]
    assert [(c["edits"], c["applied"], c["cases"]) for c in checkpoints] == [(0, 0, 10), (6, 6, 6), (9, 9, 9),
                                                                             (10, 10, 10)]
    assert checkpoints[0] == {"edits": 0, "applied": 0, **results["baseline"]}
    assert checkpoints[-1] == {"edits": 10, "applied": 10, **results["final"]}
    for c in checkpoints:
        assert all(0.0 <= c[k] <= 100.0 for k in RATES) and c["perplexity"] > 1
    assert "fluency" not in checkpoints[1] and results["baseline"]["fluency"] > 0 and results["final"]["fluency"] > 0

    # the baseline is the unedited model's scores, the final ones the edited model's
    assert {k: results["baseline"][k] for k in unedited} == unedited
    edited, edited_cases = metrics.counterfact_metrics(target, inputs.cases)
    assert {k: results["final"][k] for k in edited} == edited
    assert results["case_results"]["final"]["cases"] == edited_cases
    assert results["baseline"]["control_retained"] == 100.0  # the references are the unedited model's own
    before = [c["logprob"]["prompt"][0] for c in results["case_results"]["baseline"]["cases"]]
    after = [c["logprob"]["prompt"][0] for c in edited_cases]
    assert sum(after) > sum(before)  # the edits moved the edited prompts towards their new targets
    generations = results["case_results"]["final"]["generations"]
    assert [g[: len(c.prompt)] for g, c in zip(generations, inputs.cases)] == [c.prompt for c in inputs.cases]
    assert set(results["timings"]) >= {"baseline_eval_s", "editing_s", "checkpoint_eval_s", "final_eval_s",
                                       "protocol_s"}


def test_a_batch_the_engine_refuses_is_recorded_and_the_run_goes_on(make_target: MakeTarget):
    # The engine refuses an update larger than max_update_ratio x ||W0|| of a layer (EditFailed; the model is
    # unchanged). On this model one edit changes a layer by at most ~0.06 of its norm and 16 edits together by
    # ~0.2: at 0.11 the first batch (16 cases) is refused and the second (1 case) goes through.
    target = make_target(max_update_ratio=0.11)
    results = run_protocol(target, _inputs(17), _settings(batch_size=16), progress=False)
    refused, applied = results["batches"]
    assert not refused["applied"] and "exceeds 0.11 x the weight norm" in refused["error"]
    assert refused["model_version"] == 0 and refused["steps"] == [] and refused["steps_mean"] is None
    assert applied["applied"] and applied["error"] is None and applied["model_version"] == 1
    assert target.editor.store.edit_ids == ["eval-00001-0"]  # nothing of the refused batch is in the model
    assert results["edits_applied"] == 1 and results["edits_failed"] == 16
    assert [(c["edits"], c["applied"]) for c in results["checkpoints"]] == [(0, 0), (17, 1)]
    # the refused batch's cases are still scored on the final model
    assert results["final"]["cases"] == len(results["case_results"]["final"]["cases"]) == 17


def test_reports_of_one_run_and_a_comparison(tmp_path, target: EngineTarget, make_target: MakeTarget):
    runs, baselines = [], []
    # AlphaEdit on the shared editor; MEMIT on a fresh copy of the same model (MEMIT's C0 needs at least as
    # many statistics tokens as the layer's input width to be invertible)
    for run_target in (target, make_target(method="memit", stats_tokens=256)):
        described = run_target.describe()
        method = described["method"]
        results = run_protocol(run_target, _inputs(4), _settings(batch_size=2, checkpoint_every=2), progress=False)
        results["config"] = {"dataset": "counterfact", "method": method, "model": described["model"], "n": 4,
                             "batch_size": 2, "device": described["device"]}
        results["timings"]["total_s"] = 1.0
        written = write_run(results, tmp_path / method)
        assert [p.name for p in written] == ["results.json", "cases.json", "results.md", "curves.png",
                                             "perplexity.png"]
        assert all(p.is_file() and p.stat().st_size > 0 for p in written)
        saved = json.loads((tmp_path / method / "results.json").read_text())
        assert saved == json.loads(json.dumps({k: v for k, v in results.items() if k != "case_results"}))
        assert json.loads((tmp_path / method / "cases.json").read_text()) == json.loads(
            json.dumps(results["case_results"]))
        markdown = (tmp_path / method / "results.md").read_text()
        assert f"| {method} | 4 |" in markdown and "## Checkpoints" in markdown and "| 2 | 2 |" in markdown
        runs.append(tmp_path / method)
        baselines.append(results["baseline"])
    assert baselines[0] == baselines[1]  # the same unedited model: one "unedited" row in the comparison
    table = metrics_table([load_run(p) for p in runs])
    assert table.count("unedited tiny-llama") == 1 and "| alphaedit | 4 |" in table and "| memit | 4 |" in table
    written = write_comparison(runs, tmp_path / "compare")
    assert [p.name for p in written] == ["comparison.md", "curves.png", "perplexity.png"]
    assert (tmp_path / "compare" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| alphaedit | cpu | 2 |" in (tmp_path / "compare" / "comparison.md").read_text()
