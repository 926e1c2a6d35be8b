"""The metric definitions on known inputs (no model), and the dataset metrics on the evaluation's
real in-process target (a tiny random Llama: the tests check the numbers are the editor's own
comparisons, not that such a model learns the facts)."""
from __future__ import annotations

import math
from dataclasses import replace
from statistics import fmean

import pytest

from service.engine.editor import Editor
from service.engine.prompts import Row
from service.engine.scoring import continuation_row, score_rows
from evaluation import metrics
from evaluation.targets import Query, QueryScore
from evaluation.data import EditCase, HeldOutText, load_cases, load_heldout, load_knowns
from evaluation.targets.engine import EngineTarget
from tests.conftest import shared_data, small_text

COUNTERFACT_KEYS = ["efficacy", "generalisation", "specificity", "efficacy_top1", "generalisation_top1",
                    "specificity_top1"]


@pytest.fixture(scope="module")
def cf() -> EditCase:
    """The first CounterFact case; both cases are read from the shared data, never copied."""
    return load_cases("counterfact", shared_data("counterfact"), n=1).cases[0]


@pytest.fixture(scope="module")
def zsre() -> EditCase:
    """The first zsRE case."""
    return load_cases("zsre", shared_data("zsre"), n=1).cases[0]


# ---- pure functions -------------------------------------------------------------------------------

def test_words_split_punctuation_and_keep_contractions():
    assert metrics.words("Paris, isn't it? 42 km.") == ["Paris", ",", "isn't", "it", "?", "42", "km", "."]


def test_ngram_entropy_of_known_distributions():
    # bigrams of a b a b: (a,b) twice, (b,a) once -> H = -(2/3 log2 2/3 + 1/3 log2 1/3)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.ngram_entropy(list("abab"), 2) == pytest.approx(h2)
    assert metrics.ngram_entropy(list("abab"), 3) == pytest.approx(1.0)  # (a,b,a), (b,a,b)
    assert metrics.ngram_entropy(list("aaaa"), 2) == 0.0  # one repeated bigram: no uncertainty
    assert metrics.ngram_entropy(["a"], 2) == 0.0  # no bigram at all


def test_text_fluency_is_the_mean_of_weighted_bigram_and_trigram_entropies():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.text_fluency("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # ten distinct words: 9 distinct bigrams, 8 distinct trigrams
    ten = " ".join(f"w{i}" for i in range(10))
    assert metrics.text_fluency(ten) == pytest.approx((2 / 3 * math.log2(9) + 4 / 3 * math.log2(8)) / 2)


def test_fluency_is_scaled_by_100_and_punishes_repetition():
    varied = "The tower was built in 1889 by Gustave Eiffel for the world fair in Paris, and it still stands."
    repeated = "the the the the the the the the the the the the the the the the the the the the"
    assert metrics.fluency([varied, repeated]) == pytest.approx(
        100 * (metrics.text_fluency(varied) + metrics.text_fluency(repeated)) / 2)
    assert metrics.fluency([repeated]) == 0.0
    assert metrics.fluency([varied]) > 300
    assert metrics.fluency([]) is None


def test_rate_is_a_percentage_and_none_when_unavailable():
    assert metrics.rate([True, False, True, True]) == 75.0
    assert metrics.rate([0.5, 1.0]) == 75.0
    assert metrics.rate([True, None]) is None
    assert metrics.rate([]) is None


def test_beats_compares_mean_per_token_nll_not_the_total():
    short = QueryScore(total_logprob=-2.0, tokens=1, top1=None)  # mean -2.0
    long = QueryScore(total_logprob=-3.0, tokens=3, top1=None)  # total lower, mean -1.0
    assert metrics.beats(long, short) and not metrics.beats(short, long)


def test_perplexity_weights_by_tokens():
    scores = [QueryScore(-2.0 * 10, 10, None), QueryScore(-4.0 * 30, 30, None)]
    assert metrics.perplexity(scores) == pytest.approx(math.exp(3.5))


def test_perplexity_queries_score_each_chunk_after_its_first_word():
    heldout = HeldOutText(["alpha beta gamma", "delta epsilon"], 0, None)
    assert metrics.heldout_queries(heldout) == [Query("alpha", "beta gamma"), Query("delta", "epsilon")]


def _scores(queries: list[Query], means: dict[Query, float], top1: bool | None = None) -> list[QueryScore]:
    """Two-token scores with the given mean log-probabilities."""
    return [QueryScore(2 * means[q], 2, top1) for q in queries]


def test_counterfact_case_compares_new_and_true_targets_and_the_neighbour_the_other_way(cf: EditCase):
    queries = metrics._counterfact_queries(cf)
    prompt_new, prompt_true, rephrase_new, rephrase_true, loc_true, loc_new = queries
    (rephrase,), new, true = cf.rephrase_prompts, cf.target_new, cf.target_true
    assert queries == [Query(cf.prompt, new), Query(cf.prompt, true), Query(rephrase, new), Query(rephrase, true),
                       Query(cf.locality_prompt, cf.locality_answer), Query(cf.locality_prompt, new)]
    # the edited prompt and its paraphrase prefer the new target; the neighbour still prefers its true answer
    means = {prompt_new: -1.0, prompt_true: -2.0, rephrase_new: -0.5, rephrase_true: -3.0,
             loc_true: -0.5, loc_new: -3.0}
    case = metrics._counterfact_case(cf, _scores(queries, means, top1=True))
    assert (case["efficacy"], case["generalisation"], case["specificity"]) == (True, 1.0, True)
    assert (case["efficacy_top1"], case["generalisation_top1"], case["specificity_top1"]) == (True, 1.0, True)
    assert case["logprob"] == {"prompt": [-1.0, -2.0], "rephrase": [[-0.5, -3.0]], "locality": [-0.5, -3.0]}
    # the neighbour drawn to the new target: specificity fails, efficacy does not depend on it
    means.update({loc_true: -3.0, loc_new: -0.5, rephrase_new: -4.0})
    case = metrics._counterfact_case(cf, _scores(queries, means))
    assert (case["efficacy"], case["generalisation"], case["specificity"]) == (True, 0.0, False)
    assert case["efficacy_top1"] is None and case["generalisation_top1"] is None  # a target without argmax


def test_zsre_case_uses_token_accuracy_and_is_none_where_a_backend_cannot_tell(zsre: EditCase):
    accuracy_queries, nll_queries = metrics._zsre_queries(zsre)
    new, (rephrase,), loc = zsre.target_new, zsre.rephrase_prompts, Query(zsre.locality_prompt, zsre.locality_answer)
    assert accuracy_queries == [Query(zsre.prompt, new), Query(rephrase, new), loc]
    assert nll_queries[-1] == loc and len(nll_queries) == 5
    means = {q: -1.0 if q.continuation == new else -2.0 for q in nll_queries}
    case = metrics._zsre_case(zsre, [0.5, 1.0, 0.0], _scores(nll_queries, means, top1=False))
    assert (case["efficacy"], case["generalisation"], case["specificity"]) == (0.5, 1.0, 0.0)
    assert (case["efficacy_nll"], case["generalisation_nll"], case["efficacy_top1"]) == (True, 1.0, False)
    # over HTTP: no token accuracy and no argmax, only the NLL comparison
    http = metrics._zsre_case(zsre, [None, None, None], _scores(nll_queries, means))
    assert [http[k] for k in ("efficacy", "generalisation", "specificity", "efficacy_top1")] == [None] * 4
    assert http["efficacy_nll"] is True
    assert metrics.rate([http["efficacy"]]) is None and metrics.rate([http["efficacy_nll"]]) == 100.0


# ---- on the real in-process target -------------------------------------------------------------

def _direct_counterfact(editor: Editor, case: EditCase) -> dict:
    """The case's comparisons from the editor's own scorer, one prompt at a time."""
    new, true = editor.score(case.prompt, [case.target_new, case.target_true])
    rephrased = [editor.score(p, [case.target_new, case.target_true]) for p in case.rephrase_prompts]
    loc_true, loc_new = editor.score(case.locality_prompt, [case.locality_answer, case.target_new])
    return {
        "efficacy": new.mean_logprob > true.mean_logprob,
        "generalisation": fmean(n.mean_logprob > t.mean_logprob for n, t in rephrased),
        "specificity": loc_true.mean_logprob > loc_new.mean_logprob,
        "efficacy_top1": new.top1_correct,
        "generalisation_top1": fmean(n.top1_correct for n, _ in rephrased),
        "specificity_top1": loc_true.top1_correct,
        "logprob": {"prompt": [new.mean_logprob, true.mean_logprob],
                    "rephrase": [[n.mean_logprob, t.mean_logprob] for n, t in rephrased],
                    "locality": [loc_true.mean_logprob, loc_new.mean_logprob]},
    }


def _flat(logprob: dict) -> list[float]:
    return [*logprob["prompt"], *(x for pair in logprob["rephrase"] for x in pair), *logprob["locality"]]


def _assert_editor_agrees(summary: dict, details: list[dict], cases: list[EditCase], editor: Editor) -> None:
    for case, detail in zip(cases, details, strict=True):
        direct = _direct_counterfact(editor, case)
        assert detail["case_id"] == case.case_id
        assert {k: detail[k] for k in COUNTERFACT_KEYS} == {k: direct[k] for k in COUNTERFACT_KEYS}, case
        assert _flat(detail["logprob"]) == pytest.approx(_flat(direct["logprob"]), abs=1e-4)  # batched vs one prompt
    assert summary == {k: 100 * fmean(float(d[k]) for d in details) for k in COUNTERFACT_KEYS}
    assert all(0.0 <= summary[k] <= 100.0 for k in COUNTERFACT_KEYS)


def test_counterfact_metrics_are_the_editors_comparisons_before_and_after_an_edit(target: EngineTarget,
                                                                                  editor: Editor, cf: EditCase):
    cases = load_cases("counterfact", shared_data("counterfact"), n=4).cases
    assert cases[0] == cf
    before, before_details = metrics.counterfact_metrics(target, cases)
    _assert_editor_agrees(before, before_details, cases, editor)

    outcome = target.apply([cf.request()], "b0")
    assert outcome.applied and outcome.error is None and outcome.model_version == editor.version == 1
    assert len(outcome.steps) == len(outcome.target_nll) == 1 and outcome.timings["targets_s"] > 0

    after, after_details = metrics.counterfact_metrics(target, cases)
    _assert_editor_agrees(after, after_details, cases, editor)  # scored on the edited model
    # the edit moved the edited prompt towards its new target
    assert after_details[0]["logprob"]["prompt"][0] > before_details[0]["logprob"]["prompt"][0]


def test_zsre_metrics_on_the_in_process_backend(target: EngineTarget, editor: Editor, zsre: EditCase):
    # the model's own greedy answer is right token by token; one more word makes it partly right
    greedy = target.generate([zsre.prompt], 3)[0].strip()
    cases = [zsre, replace(zsre, target_new=greedy), replace(zsre, target_new=greedy + " zebra")]
    summary, details = metrics.zsre_metrics(target, cases)
    for case, detail in zip(cases, details, strict=True):
        new, true = editor.score(case.prompt, [case.target_new, case.target_true])
        (rephrased_new,) = editor.score(case.rephrase_prompts[0], [case.target_new])
        (loc,) = editor.score(case.locality_prompt, [case.locality_answer])
        for key, score in (("efficacy", new), ("generalisation", rephrased_new), ("specificity", loc)):
            accuracy = detail[key]
            assert accuracy * score.tokens == pytest.approx(round(accuracy * score.tokens))  # a share of the tokens
            assert detail[f"{key}_top1"] == (accuracy == 1.0) == score.top1_correct  # exact <=> every token right
        assert detail["efficacy_nll"] is (new.mean_logprob > true.mean_logprob)
    assert details[1]["efficacy"] == 1.0 and details[1]["efficacy_top1"] is True
    assert 0.0 < details[2]["efficacy"] < 1.0 and details[2]["efficacy_top1"] is False
    for key in ("efficacy", "generalisation", "specificity", "efficacy_top1", "efficacy_nll"):
        assert summary[key] == pytest.approx(100 * fmean(float(d[key]) for d in details))


def test_token_accuracy_equals_one_prompt_per_token(target: EngineTarget, editor: Editor):
    """One teacher-forced row per query must judge each token as the paper's one-prompt-per-token
    loop does: the greedy answer is all right, extra words partly wrong."""
    cases = load_cases("zsre", shared_data("zsre"), n=4).cases
    greedy = target.generate([c.prompt for c in cases], 4)
    queries = [Query(c.prompt, g.strip() + tail) for c, g in zip(cases, greedy) for tail in ("", " zebra crossing")]
    queries += [Query(c.locality_prompt, c.locality_answer) for c in cases]
    per_token = []
    for q in queries:
        full = continuation_row(editor.tokenizer, q.prompt, q.continuation)
        prompt_ids = full.ids[: len(full.ids) - len(full.targets) + 1]
        rows = [Row(0, prompt_ids + full.targets[:k], len(prompt_ids) + k - 1, (t,)) for k, t in enumerate(full.targets)]
        scores = score_rows(editor.adapter, None, rows, editor.tokenizer.pad_token_id)
        per_token.append(sum(s.top1_correct for s in scores) / len(scores))
    assert target.token_accuracy(queries) == per_token
    assert per_token[0] == 1.0 and 0.0 < per_token[1] < 1.0


def test_control_is_retained_only_where_the_continuation_is_unchanged(target: EngineTarget, editor: Editor):
    facts = load_knowns(shared_data("knowns"), count=1)
    references = metrics.control_references(target, facts, 8)
    summary, details = metrics.control_metrics(target, facts, references, 8)
    assert summary["control_retained"] == 100.0 and details[0]["reference"] == details[0]["now"]  # greedy: stable
    (attribute,) = editor.score(facts[0].prompt, [facts[0].attribute])
    assert details[0]["attribute_top1"] is attribute.top1_correct
    assert summary["control_top1"] == 100.0 * attribute.top1_correct
    summary, _ = metrics.control_metrics(target, facts, ["something else"], 8)
    assert summary["control_retained"] == 0.0
    assert metrics.control_metrics(target, [], [], 8)[0] == {"control_retained": None, "control_top1": None}


def test_fluency_and_perplexity_of_the_in_process_backend(target: EngineTarget, editor: Editor, cf: EditCase,
                                                          zsre: EditCase):
    value, texts = metrics.fluency_metric(target, [cf, zsre], 12)
    assert [t[: len(c.prompt)] for t, c in zip(texts, [cf, zsre])] == [cf.prompt, zsre.prompt]
    assert all(len(t) > len(c.prompt) for t, c in zip(texts, [cf, zsre]))
    assert value == pytest.approx(metrics.fluency(texts)) and value > 0
    heldout = load_heldout(small_text(), chunks=2)
    direct = [editor.score(q.prompt, [q.continuation])[0] for q in metrics.heldout_queries(heldout)]
    expected = math.exp(-sum(s.total_logprob for s in direct) / sum(s.tokens for s in direct))
    assert metrics.perplexity_metric(target, heldout) == pytest.approx(expected, rel=1e-4) and expected > 1
