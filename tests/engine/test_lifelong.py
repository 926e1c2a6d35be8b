"""Lifelong editing: most-probable early stopping, the norm penalty, the profiles."""
from __future__ import annotations

import json

import pytest
import torch

from service.engine import solve
from service.engine.compute_z import compute_targets
from service.engine.editor import Editor
from service.engine.templates import context_templates
from service.engine.types import EditRequest, HyperParams, load_hparams

from tests.conftest import shared_data

from .conftest import tiny_model, wikitext_moments
from .test_architectures import HP, REQUESTS

MORE = [
    EditRequest("Toyota", "Toyota is headquartered in", "Berlin", "Japan"),
    EditRequest("Python", "Python was created by", "Linus Torvalds", "Guido van Rossum"),
    EditRequest("Mount Everest", "Mount Everest is located in", "Canada", "Nepal"),
]


def test_profiles_paper_restores_the_previous_stop_and_default_uses_mpes():
    default, paper = load_hparams("smollm2"), load_hparams("smollm2", "paper")
    assert default.profile == "default" and paper.profile == "paper"
    assert default.v_stop_greedy_margin is not None and paper.v_stop_greedy_margin is None
    assert paper.v_stop_nll == 0.05 and paper.norm_penalty == 0.0 and paper.v_lr == 0.5
    with pytest.raises(ValueError, match="unknown profile"):
        load_hparams("smollm2", "fast")


def test_norm_pull_is_the_accumulated_update_seen_along_the_residuals():
    g = torch.Generator().manual_seed(0)
    accumulated, resid = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g,
                                                                                            dtype=torch.float64)
    pull = solve.norm_pull(accumulated, resid, 3.0)
    torch.testing.assert_close(pull @ (resid.T @ resid), 3.0 * accumulated.T @ resid)
    assert solve.norm_pull(torch.zeros(6, 10, dtype=torch.float64), resid, 3.0) is None
    assert solve.norm_pull(accumulated, resid, 0.0) is None


def test_norm_penalty_minimises_the_published_objective_over_rank_n_updates():
    """A from the closed form beats small perturbations of it on
    ‖ΔW K − R‖² + tr(ΔW C_p ΔWᵀ) + λ‖ΔW‖² + μ‖D + ΔW‖², with ΔW = R Aᵀ (MEMIT form, C0 = 0)."""
    g = torch.Generator().manual_seed(1)
    d_out, d_in, n = 5, 8, 2
    keys, resid = torch.randn(d_in, n, generator=g, dtype=torch.float64), torch.randn(d_out, n, generator=g,
                                                                                       dtype=torch.float64)
    prior_keys = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    prior, acc = prior_keys @ prior_keys.T, torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    lam, mu = 0.7, 2.0

    def objective(a: torch.Tensor) -> float:
        dw = resid @ a.T
        return float(((dw @ keys - resid) ** 2).sum() + torch.trace(dw @ prior @ dw.T)
                     + lam * (dw ** 2).sum() + mu * ((acc + dw) ** 2).sum())

    second_moment = torch.eye(d_in, dtype=torch.float64)  # λ C0 with C0 = I is the ridge λ
    a = solve.memit_directions(keys, second_moment, prior, lam, mu, solve.norm_pull(acc, resid, mu))
    best = objective(a)
    for _ in range(20):
        assert objective(a + 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)) > best


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_norm_penalty_keeps_revert_exact_and_weights_a_function_of_the_ledger(smollm2, method):
    tiny = tiny_model("llama", smollm2.tokenizer)
    hp = HP.with_overrides(norm_penalty=50.0, stats_tokens=64 if method == "alphaedit" else 2048)
    moments = wikitext_moments(tiny, hp)
    editor = Editor(tiny, hp, moments, method=method)
    plain = Editor(tiny_model("llama", smollm2.tokenizer), hp.with_overrides(norm_penalty=0.0), moments,
                   method=method, templates=editor.templates)
    try:
        batches = [(REQUESTS[:2], ["a", "b"]), (REQUESTS[2:] + MORE[:1], ["c", "d"]), (MORE[1:], ["e", "f"])]
        updates = []
        for version, (requests, ids) in enumerate(batches, start=1):
            updates.append(editor.compute(requests, ids, f"batch-{version}"))
            editor.install(editor.plan_commit(updates[-1]), version)
            plain.install(plain.plan_commit(plain.compute(requests, ids, f"batch-{version}")), version)
        norm = {layer: float(editor.store.accumulated(layer).norm()) for layer in editor.layers}
        assert sum(norm.values()) < sum(float(plain.store.accumulated(layer).norm()) for layer in plain.layers)
        editor.install(editor.plan_revert("a"), 4)
        fresh = Editor(tiny_model("llama", smollm2.tokenizer), hp, moments, method=method, templates=editor.templates)
        fresh.load([e for u in updates for e in u.edits if e.edit_id != "a"], version=4)
        for layer in editor.layers:
            assert torch.equal(fresh.adapter.edited_module(layer).weight, editor.adapter.edited_module(layer).weight)
        assert fresh.weights_digest() == editor.weights_digest()
        fresh.close()
    finally:
        editor.close()
        plain.close()


@pytest.mark.slow
def test_early_stop_ends_sooner_with_the_target_greedy_on_its_prompts(smollm2):
    cases = json.loads(shared_data("counterfact").read_text())[:8]
    requests = [EditRequest(c["subject"], c["prompt"], c["target_new"], c["ground_truth"]) for c in cases]
    default, paper = load_hparams("smollm2"), load_hparams("smollm2", "paper")
    from service.model.adapters import ModelAdapter

    adapter = ModelAdapter(smollm2.model)
    templates = context_templates(smollm2.model, smollm2.tokenizer, default.context_seed, default.context_template_len)
    last = default.layers[-1]
    mpes = compute_targets(adapter, smollm2.tokenizer, requests, templates, default, last)
    nll = compute_targets(adapter, smollm2.tokenizer, requests, templates, paper, last)
    assert sum(mpes.steps) < 0.85 * sum(nll.steps), (mpes.steps, nll.steps)
    for steps, greedy in zip(mpes.steps, mpes.greedy):
        assert greedy or steps == default.v_num_grad_steps
    assert sum(mpes.greedy) >= 6
    # the stop is earlier because the target is pushed less far, not because it failed
    assert (mpes.z - mpes.h0).norm(dim=1).mean() < (nll.z - nll.h0).norm(dim=1).mean()


def test_hyperparams_reject_unknown_profile_keys():
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        HyperParams.from_dict({"v_lr": 0.1, "nonsense": 1})


def _lifelong_run(profile: str, n: int, batch: int) -> tuple[dict, float]:
    """n sequential CounterFact edits on a fresh SmolLM2 with the profile's shipped settings (WikiText
    statistics, cached by the other SmolLM2 tests), scored by the evaluation's own protocol; with the
    Frobenius norm of the accumulated update, summed over the edited layers."""
    from evaluation.data import load_cases, load_heldout
    from evaluation.runner import EvalInputs, ProtocolSettings, run_protocol
    from evaluation.targets.engine import EngineTarget, open_editor
    from service.config import Settings

    from .conftest import CACHE_DIR

    heldout = load_heldout(shared_data("wikitext"), chunks=8)
    service_settings = Settings(device="cpu", cache_dir=CACHE_DIR, corpus=str(shared_data("wikitext")),
                                profile=profile, stats_tokens=20_000)
    editor, _ = open_editor(service_settings, heldout, progress=False)
    try:
        inputs = EvalInputs(load_cases("counterfact", shared_data("counterfact"), n).cases, [], heldout)
        settings = ProtocolSettings("counterfact", batch, fluency_tokens=0)
        results = run_protocol(EngineTarget(editor), inputs, settings, progress=False)
        norm = sum(float(editor.store.accumulated(layer).norm()) for layer in editor.layers)
        return results, norm
    finally:
        editor.close()


# docs/evaluation.md: after 100 edits in a batch of 100 the default profile has efficacy 99, specificity
# at the unedited level, perplexity +0.9%; at 200 edits the paper profile drifts +7.9%. The bounds
# leave room for 120 cases' noise (one case is 0.8 points).
EFFICACY_MIN = 90.0
PPL_DRIFT_MAX = 1.06
SPECIFICITY_DROP_MAX = 6.0


@pytest.mark.slow
def test_120_sequential_edits_stay_in_bounds_with_less_optimisation_than_the_paper_profile():
    """The scaled-down lifelong check (two batches of 60): the shipped defaults keep efficacy,
    held-out perplexity and specificity inside bounds, while optimising the targets less than the
    previous defaults (the paper profile: v_lr 0.5, stop at target NLL 0.05) on the same edits, the
    over-optimisation ENCORE traces lifelong degradation to. That the paper profile then breaks the
    perplexity bound shows at 200 edits (+7.9%, docs/evaluation.md), beyond what CI can afford."""
    (default, default_norm), (paper, paper_norm) = _lifelong_run("default", 120, 60), _lifelong_run("paper", 120, 60)
    base, new, old = default["baseline"], default["final"], paper["final"]
    print(f"lifelong-120: baseline {base}\ndefault {new} |D| {default_norm:.3f}\npaper {old} |D| {paper_norm:.3f}")
    assert new["efficacy"] >= EFFICACY_MIN, new
    assert new["perplexity"] <= PPL_DRIFT_MAX * base["perplexity"], (new["perplexity"], base["perplexity"])
    assert new["specificity"] >= base["specificity"] - SPECIFICITY_DROP_MAX, new

    def mean_of(run: dict, key: str) -> float:
        return sum(b[key] for b in run["batches"]) / len(run["batches"])

    assert mean_of(default, "steps_mean") < mean_of(paper, "steps_mean")
    assert mean_of(default, "target_nll_mean") > 2 * mean_of(paper, "target_nll_mean")
