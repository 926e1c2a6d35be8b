"""Corpus sources and packing: the no-file default is reproducible; budgets are exact."""
from __future__ import annotations

import itertools

import torch

from service.engine.corpus import SelfGeneratedCorpus, TextCorpus, nucleus_sample, packed_batches
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


def test_nucleus_sampling_draws_from_the_nucleus_alone_in_proportion():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 500, generator=generator) * torch.tensor([[6.0], [0.2]])
    probs = logits.softmax(-1)
    assert probs[0].topk(32).values.sum() >= 0.9 > probs[1].topk(32).values.sum()  # both paths are taken
    draws = 6000
    tokens = nucleus_sample(probs.repeat_interleave(draws, 0), 0.9, generator, candidates=32).view(2, draws)
    for row in range(2):
        ordered, index = probs[row].sort(descending=True)
        inside = (ordered.cumsum(0) - ordered) < 0.9  # the smallest top set whose mass reaches 0.9
        nucleus = dict(zip(index[inside].tolist(), (ordered[inside] / ordered[inside].sum()).tolist()))
        assert set(tokens[row].tolist()) <= set(nucleus)
        top, p = index[0].item(), nucleus[index[0].item()]
        seen = (tokens[row] == top).float().mean().item()
        assert abs(seen - p) < 5 * (p * (1 - p) / draws) ** 0.5 + 1e-3
