"""Numerical abuse through the worker (real ledger, real tiny editor): one fact edited back and forth 50
times, and 200 edits piled on one subject. Every weight must stay finite, every edit must be applied or
failed with a reason, the edited matrices must not blow up, the model's perplexity on held text must
stay within a bounded drift of the unedited model's, and a replay from scratch must give the same bits.

Bounds, and why. The tiny model is random (its perplexity on English text is in the thousands and means
nothing as a language model), so "bounded perplexity" here is a drift bound: log-perplexity may move by
at most LOG_PPL_DRIFT_MAX nats from the unedited model's (a factor of e^1 = 2.7). The measured drifts
(printed by each test) are far below it; a blow-up (an update that escapes its null space, weights that
grow without bound) moves it by many nats, or to inf/nan. The edited matrices' accumulated update may
grow to at most MAX_RELATIVE_GROWTH times the unedited matrix's Frobenius norm: each single update is
already refused above 1 x (max_update_ratio), and AlphaEdit's projection keeps successive updates of
one fact from compounding.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from service.engine.editor import Editor
from service.engine.types import HyperParams
from service.ledger import repository as repo
from service.ledger.db import make_engine, migrate, session_factory
from service.model.loading import load_model
from service.queue.local import LocalQueue
from tests.conftest import small_text
from tests.engine.conftest import CACHE_DIR, tiny_model, wikitext_moments
from workers.worker import Worker

pytestmark = pytest.mark.slow

HP = HyperParams(layers=(1, 2, 3), v_num_grad_steps=5, stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)
LOG_PPL_DRIFT_MAX = 1.0  # nats
MAX_RELATIVE_GROWTH = 2.0  # ||W - W0||_F / ||W0||_F per edited layer
HELD_TOKENS = 512
SUBJECT = "Eiffel Tower"
RELATIONS = [
    ("The {} is located in the city of", ["Rome", "Paris", "London", "Tokyo", "Berlin", "Madrid", "Oslo", "Cairo"]),
    ("The {} was designed by", ["Gustave Eiffel", "a committee", "Le Corbusier", "Zaha Hadid", "nobody"]),
    ("The {} is made of", ["iron", "wood", "glass", "stone", "cheese", "steel"]),
    ("The {} was finished in the year", ["1889", "1901", "1750", "2020", "1066"]),
    ("Visitors to the {} usually arrive by", ["metro", "boat", "bicycle", "horse", "train"]),
]


@pytest.fixture(scope="module")
def parts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = load_model("smollm2", cache_dir=CACHE_DIR).tokenizer
    moments = wikitext_moments(tiny_model("llama", tokenizer), HP)
    yield tokenizer, moments
    torch.set_num_threads(threads)


def _editor(parts) -> Editor:
    tokenizer, moments = parts
    return Editor(tiny_model("llama", tokenizer), HP, moments, templates=["{}"], keep_factors=False)


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


@torch.no_grad()
def log_perplexity(editor: Editor) -> float:
    """Mean next-token NLL (nats) of the model on the tests' own held text (HELD_TOKENS tokens)."""
    ids = editor.tokenizer(small_text().read_text(), return_tensors="pt").input_ids[:, :HELD_TOKENS]
    return float(editor.model(input_ids=ids, labels=ids).loss)


def relative_growth(editor: Editor) -> dict[int, float]:
    return {layer: float((editor.adapter.weight(layer).float() - editor.store.base_weight(layer).float()).norm()
                         / editor.store.base_weight(layer).float().norm()) for layer in editor.layers}


def _submit_and_drain(worker: Worker, sessions, requests: list[dict]) -> list[str]:
    with sessions() as session:
        edits, _ = repo.create_edits(session, requests, subjects=[r["subject"] for r in requests], requested_by="test",
                                     method="alphaedit", idempotency_key=None)
        session.commit()
        ids = [e.id for e in edits]
    while worker.process_next():
        pass
    return ids


def _request(template: str, target_new: str, target_true: str | None = None) -> dict:
    return {"subject": SUBJECT, "prompt": template.format(SUBJECT), "target_new": target_new,
            "target_true": target_true, "rephrase_prompts": [], "locality_prompts": []}


def _check_health(parts, worker: Worker, sessions, ids: list[str], base_log_ppl: float) -> dict:
    editor = worker.editor
    assert all(torch.isfinite(p).all() for p in editor.model.parameters()), "a weight is not finite"
    with sessions() as session:
        edits = [repo.get_edit(session, i) for i in ids]
        assert repo.verify_chain(session) == len(ids)
    statuses = Counter(e.status for e in edits)
    assert set(statuses) <= {"applied", "failed"}, statuses
    assert all(e.error for e in edits if e.status == "failed"), "a failed edit without its reason"
    norms = [v for e in edits if e.status == "applied" for v in e.update_norms.values()]
    assert all(math.isfinite(v) for v in norms)
    drift = log_perplexity(editor) - base_log_ppl
    growth = relative_growth(editor)
    figures = {"statuses": dict(statuses), "log_ppl_base": round(base_log_ppl, 3), "log_ppl_drift": round(drift, 4),
               "relative_growth": {k: round(v, 4) for k, v in growth.items()}, "max_update_norm": max(norms, default=0)}
    print(figures)
    assert abs(drift) <= LOG_PPL_DRIFT_MAX, figures
    assert max(growth.values()) <= MAX_RELATIVE_GROWTH, figures
    cold = Worker(_editor(parts), sessions, LocalQueue())
    cold.replay()
    assert cold.editor.weights_digest() == editor.weights_digest()
    return figures


def test_one_fact_edited_back_and_forth_50_times(parts, sessions):
    worker = Worker(_editor(parts), sessions, LocalQueue(), batch_size=1)
    base = log_perplexity(worker.editor)
    template = RELATIONS[0][0]
    ids = []
    for i in range(50):
        new, old = ("Rome", "Paris") if i % 2 == 0 else ("Paris", "Rome")
        ids += _submit_and_drain(worker, sessions, [_request(template, new, old)])
    figures = _check_health(parts, worker, sessions, ids, base)
    assert figures["statuses"].get("applied", 0) >= 40, figures  # refusals are allowed, but not the rule


def test_200_edits_on_one_subject(parts, sessions):
    worker = Worker(_editor(parts), sessions, LocalQueue(), batch_size=16)
    base = log_perplexity(worker.editor)
    requests = [_request(template, targets[(i // len(RELATIONS)) % len(targets)])
                for i, (template, targets) in ((i, RELATIONS[i % len(RELATIONS)]) for i in range(200))]
    ids = _submit_and_drain(worker, sessions, requests)
    figures = _check_health(parts, worker, sessions, ids, base)
    assert figures["statuses"].get("applied", 0) >= 150, figures
