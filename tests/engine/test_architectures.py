"""Every supported architecture, on a tiny random model: shapes, exact revert, null-space property."""
from __future__ import annotations

import pytest
import torch

from service.engine.compute_z import _run_suffix, build_rows
from service.engine.corpus import TextCorpus, packed_batches
from service.engine.editor import Editor
from service.engine.prefix_cache import split_at_lookup
from service.engine.prompts import pad_rows
from service.engine.types import EditRequest, HyperParams
from service.errors import UnsupportedArchitecture
from service.model.adapters import ModelAdapter, architecture_for
from tests.conftest import small_text

from .conftest import TINY_CONFIGS, tiny_model, wikitext_moments

REQUESTS = [
    EditRequest("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    EditRequest("Eiffel Tower", "The Eiffel Tower is located in", "Rome", "Paris"),
    EditRequest("Lionel Messi", "Lionel Messi plays the sport of", "tennis", "football"),
]
# 64 statistics tokens for 128 key dimensions: C0 is rank-deficient, so the keys it was built
# from lie exactly outside the null space and the property is sharp even on a random model.
HP = HyperParams(layers=(1, 2, 3), v_num_grad_steps=5, stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, smollm2):
    return tiny_model(request.param, smollm2.tokenizer)


@pytest.fixture(scope="module")
def editors(tiny):
    # MEMIT needs a full-rank C0 (its solve is (λ C0 + K Kᵀ) A = K): more statistics tokens.
    memit_hp = HP.with_overrides(stats_tokens=2048)
    built = {"alphaedit": Editor(tiny, HP, wikitext_moments(tiny, HP), method="alphaedit"),
             "memit": Editor(tiny, memit_hp, wikitext_moments(tiny, memit_hp), method="memit")}
    yield built
    for editor in built.values():
        editor.close()


def _corpus_keys(editor: Editor, layer: int) -> torch.Tensor:
    """Keys (d_in, N) of corpus tokens: the knowledge the projector was built to preserve."""
    documents = TextCorpus(small_text()).documents(editor.tokenizer)
    ids = next(packed_batches(documents, HP.stats_seq_len, 1, HP.stats_tokens, editor.tokenizer.eos_token_id))
    with editor.trace.tracing(capture=[layer]) as captured:
        editor.adapter.slice(0, layer + 1)(input_ids=ids)
    return captured[layer].reshape(-1, captured[layer].shape[-1]).T.double()


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="gpt2.*llama"):
        architecture_for("t5")


def test_split_suffix_forward_matches_the_full_model(tiny):
    """The cached-prefix path of compute_z gives the logits of a plain forward pass."""
    adapter = ModelAdapter(tiny.model)
    rewriting, kl = build_rows(tiny.tokenizer, REQUESTS, ["{}", "Some context. {}"])
    rows = rewriting + kl
    ids, mask = pad_rows(rows, tiny.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        full = tiny.model(input_ids=ids, attention_mask=mask).logits
        hidden = adapter.slice(0, 3)(input_ids=ids, attention_mask=mask).last_hidden_state
        tail = adapter.slice(3, adapter.num_layers)
        suffix = split_at_lookup(tail, hidden, mask.sum(1), torch.tensor([r.lookup for r in rows]))
        out = _run_suffix(tail, suffix, torch.zeros(len(rows), hidden.shape[-1]))
    for i, row in enumerate(rows):
        positions = list(row.target_positions) or [row.lookup]
        split_logits = adapter.logits_at(out[i, [p - row.lookup for p in positions]])
        torch.testing.assert_close(split_logits, full[i, positions], atol=2e-4, rtol=1e-4)


def test_factor_shapes_and_exact_revert(editors, tiny):
    editor = editors["alphaedit"]
    adapter = editor.adapter
    base = {layer: adapter.edited_module(layer).weight.detach().clone() for layer in editor.layers}
    update = editor.compute(REQUESTS[:2], ["a", "b"], "batch-1")
    d_out, d_in = adapter.weight(1).shape
    for edit in update.edits:
        for layer, factor in edit.layers.items():
            assert factor.r.shape == (d_out,) and factor.a.shape == (d_in,) and factor.k.shape == (d_in,)
    editor.install(editor.plan_commit(update), 1)
    second = editor.compute(REQUESTS[2:], ["c"], "batch-2")
    editor.install(editor.plan_commit(second), 2)
    assert any(not torch.equal(base[l], adapter.edited_module(l).weight) for l in editor.layers)
    editor.install(editor.plan_revert("a"), 3)
    fresh = Editor(tiny, HP, editor.second_moments, method="alphaedit", templates=editor.templates)
    fresh.load([e for e in update.edits + second.edits if e.edit_id != "a"], version=3)
    for layer in editor.layers:  # revert == recomposition from scratch, bit for bit
        assert torch.equal(fresh.adapter.edited_module(layer).weight, adapter.edited_module(layer).weight)
        # C_p is a float64 running sum (exact up to rounding): it shapes later edits only
        torch.testing.assert_close(fresh.store.prior(layer), editor.store.prior(layer), rtol=1e-12, atol=1e-12)
    fresh.close()
    editor.install(editor.plan_revert("b"), 4)
    editor.install(editor.plan_revert("c"), 5)
    for layer in editor.layers:
        assert torch.equal(base[layer], adapter.edited_module(layer).weight)
        assert float(editor.store.prior(layer).abs().max()) < 1e-9


def test_null_space_property(editors):
    """For preserved keys K0: ||ΔW K0|| << ||ΔW|| ||K0|| with AlphaEdit, not with MEMIT.

    ||ΔW||_2 is the operator norm, so the ratio is at most 1 and is the share of K0 the update sees.
    """
    ratios = {}
    for method, editor in editors.items():
        update = editor.compute(REQUESTS, ["x", "y", "z"], "b")
        layer = editor.layers[0]
        a, r = update.pending[layer]
        delta_w = (r.double() @ a.double().T)  # (d_out, d_in)
        keys = _corpus_keys(editor, layer)
        ratios[method] = float((delta_w @ keys).norm() / (torch.linalg.matrix_norm(delta_w, 2) * keys.norm()))
    assert ratios["alphaedit"] < 1e-3, ratios
    assert ratios["memit"] > 20 * ratios["alphaedit"], ratios
