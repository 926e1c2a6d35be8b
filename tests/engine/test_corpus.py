"""Corpus sources and packing: the no-file default is reproducible; budgets are exact."""
from __future__ import annotations

import itertools

import torch

from service.engine.corpus import SelfGeneratedCorpus, TextCorpus, packed_batches
from tests.conftest import small_text

from .conftest import tiny_model


def test_self_generated_corpus_is_reproducible(smollm2):
    tiny = tiny_model("llama", smollm2.tokenizer)

    def sample(seed: int) -> list[list[int]]:
        corpus = SelfGeneratedCorpus(tiny.model, tiny.fingerprint, seed=seed, tokens_per_document=6, batch_size=4)
        return list(itertools.islice(corpus.documents(tiny.tokenizer), 4))

    first, again, other = sample(0), sample(0), sample(1)
    assert first == again and first != other
    assert all(0 < len(doc) <= 16 for doc in first)  # opening + at most 6 sampled tokens
    assert SelfGeneratedCorpus(tiny.model, tiny.fingerprint, seed=0).fingerprint != \
        SelfGeneratedCorpus(tiny.model, tiny.fingerprint, seed=1).fingerprint


def test_packing_spends_exactly_the_budget_without_padding(smollm2):
    documents = TextCorpus(small_text()).documents(smollm2.tokenizer)
    batches = list(packed_batches(documents, seq_len=64, batch_size=3, budget=1000, separator=0))
    assert sum(b.numel() for b in batches) == 1000
    assert [tuple(b.shape) for b in batches] == [(3, 64)] * 5 + [(1, 40)]
    assert all(b.dtype == torch.long for b in batches)


def test_text_corpus_fingerprint_follows_the_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one two three")
    before = TextCorpus(path).fingerprint
    path.write_text("one two four")
    assert TextCorpus(path).fingerprint != before
