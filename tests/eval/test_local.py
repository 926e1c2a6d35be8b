"""The in-process target on the real SmolLM2: its scores agree with each other and with generation."""
from __future__ import annotations

import pytest

from evaluation.data import load_heldout
from evaluation.targets import Query
from evaluation.targets.engine import EngineTarget, _chunks, check_heldout_disjoint, open_editor
from service.config import Settings
from service.engine.prompts import Row
from service.errors import InvalidRequest
from tests.conftest import TEST_CACHE, shared_data

QUERIES = [
    Query("The capital of France is", "Paris"), Query("The Eiffel Tower is located in", "Rome"),
    Query("Danielle Darrieux's mother tongue is", "French"), Query("Lionel Messi plays", "football for Barcelona"),
]


def test_chunks_bound_padded_and_target_tokens():
    rows = [Row(0, tuple(range(n)), 0, tuple(range(t))) for n, t in [(4, 1), (10, 2), (3, 1), (3, 1), (20, 15)]]
    chunks = list(_chunks(rows, max_tokens=24, max_targets=4))
    assert [len(c) for c in chunks] == [2, 2, 1]  # 2 rows of width 10 = 20 padded tokens; a long row alone
    assert [r for c in chunks for r in c] == rows
    assert len(list(_chunks(rows[:1], max_tokens=1, max_targets=0))[0]) == 1  # an oversized row still goes


@pytest.fixture(scope="module")
def target():
    wikitext = shared_data("wikitext")
    settings = Settings(device="cpu", cache_dir=TEST_CACHE, corpus=str(wikitext), stats_tokens=20_000)
    editor, _ = open_editor(settings, load_heldout(wikitext, chunks=2), progress=False)
    yield EngineTarget(editor)
    editor.close()


@pytest.mark.slow
def test_token_accuracy_matches_top1_and_chunking_changes_nothing(target):
    scores = target.score(QUERIES)
    accuracy = target.token_accuracy(QUERIES)
    for query, score, acc in zip(QUERIES, scores, accuracy):
        assert 0.0 <= acc <= 1.0
        assert score.top1 == (acc == 1.0), query  # all tokens right <=> every per-token row right
    tiny = EngineTarget(target.editor, max_batch_tokens=16, max_target_tokens=2)
    for a, b in zip(scores, tiny.score(QUERIES)):
        assert a.tokens == b.tokens and a.top1 == b.top1
        assert a.total_logprob == pytest.approx(b.total_logprob, abs=1e-3)


@pytest.mark.slow
def test_greedy_generation_returns_the_continuation_and_agrees_with_top1(target):
    prompts = [q.prompt for q in QUERIES]
    first = target.generate(prompts, 6)
    assert first == target.generate(prompts, 6)
    assert not any(text.startswith(prompt) for text, prompt in zip(first, prompts))
    # teacher-forced top-1 of the model's own greedy continuation is true (batched = single)
    single = [target.generate([p], 6)[0] for p in prompts]
    assert single == first
    scores = target.score([Query(p, t.strip()) for p, t in zip(prompts, first) if t.strip()])
    assert sum(s.top1 for s in scores) >= len(scores) - 1  # re-tokenising text can split one differently


@pytest.mark.slow
def test_statistics_budget_reaching_the_perplexity_slice_is_refused(target):
    from service.engine.corpus import TextCorpus

    heldout = load_heldout(shared_data("wikitext"), chunks=2)
    check_heldout_disjoint(target.editor.loaded, TextCorpus(heldout.path), heldout, 20_000)
    with pytest.raises(InvalidRequest, match="lower --stats-tokens"):
        check_heldout_disjoint(target.editor.loaded, TextCorpus(heldout.path), heldout, 10_000_000)
