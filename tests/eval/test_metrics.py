"""The metric definitions on known inputs, and the dataset metrics on a model-free backend."""
from __future__ import annotations

import math

import pytest

from service.eval import metrics
from service.eval.backend import Query, QueryScore
from service.eval.data import EditCase, HeldOutText, KnownFact

from .fakes import FakeBackend

CASE = EditCase("7", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French",
                ("Danielle Darrieux speaks",), "Léon Blum's mother tongue is", "French")


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


def test_counterfact_metrics_before_and_after_an_edit():
    backend = FakeBackend()
    before, details = metrics.counterfact_metrics(backend, [CASE])
    assert before["efficacy"] == 0.0 and before["generalisation"] == 0.0
    backend.apply([CASE.request()], "b0")
    after, details = metrics.counterfact_metrics(backend, [CASE])
    assert after["efficacy"] == 100.0 and after["generalisation"] == 100.0 and after["efficacy_top1"] == 100.0
    assert after["specificity"] == before["specificity"]  # another subject: untouched
    assert details[0]["case_id"] == "7" and len(details[0]["logprob"]["rephrase"]) == 1


def test_counterfact_specificity_asks_the_true_answer_to_beat_the_new_target():
    class Scores:
        kind = "fixed"

        def score(self, queries):  # the neighbour prefers its true answer (French) to English
            return [QueryScore(-0.5 if q.continuation == "French" else -3.0, 1, False) for q in queries]

    summary, _ = metrics.counterfact_metrics(Scores(), [CASE])
    assert summary["specificity"] == 100.0 and summary["efficacy"] == 0.0


def test_zsre_metrics_token_accuracy_and_none_top1_over_http_like_backends():
    case = EditCase("0", "UniFirst", "What is the product made by UniFirst?", "unmanned aircraft", "uniform",
                    ("What will be the product of UniFirst?",), "nq question: who wrote hamlet?", "Shakespeare")

    class NoArgmax(FakeBackend):
        def score(self, queries):
            return [QueryScore(s.total_logprob, s.tokens, None) for s in super().score(queries)]

        def token_accuracy(self, queries):
            return [None] * len(queries)

    backend = FakeBackend()
    backend.apply([case.request()], "b0")
    summary, _ = metrics.zsre_metrics(backend, [case])
    assert summary["efficacy"] == 100.0 and summary["generalisation"] == 100.0 and summary["specificity"] == 0.0
    assert summary["efficacy_nll"] == 100.0
    http_like = NoArgmax()
    http_like.apply([case.request()], "b0")
    summary, _ = metrics.zsre_metrics(http_like, [case])
    assert summary["efficacy"] is None and summary["efficacy_top1"] is None and summary["efficacy_nll"] == 100.0


def test_perplexity_queries_score_each_chunk_after_its_first_word():
    heldout = HeldOutText(["alpha beta gamma", "delta epsilon"], 0, None)
    assert metrics.heldout_queries(heldout) == [Query("alpha", "beta gamma"), Query("delta", "epsilon")]


def test_control_is_retained_only_where_the_continuation_is_unchanged():
    facts = [KnownFact(0, "Vinson Massif", "Vinson Massif is located in the continent of", "Antarctica")]
    backend = FakeBackend()
    references = metrics.control_references(backend, facts, 8)
    summary, details = metrics.control_metrics(backend, facts, references, 8)
    assert summary["control_retained"] == 100.0 and details[0]["reference"] == details[0]["now"]
    summary, _ = metrics.control_metrics(backend, facts, ["something else"], 8)
    assert summary["control_retained"] == 0.0
    assert metrics.control_metrics(backend, [], [], 8)[0] == {"control_retained": None, "control_top1": None}
