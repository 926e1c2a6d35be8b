"""The factor store: weights and key statistics as pure functions of the active edits."""
from __future__ import annotations

import torch

from service.engine.factors import EditFactors, FactorStore, LayerFactor


def _edit(edit_id: str, batch: str, seed: int, d_out: int = 6, d_in: int = 10) -> EditFactors:
    g = torch.Generator().manual_seed(seed)
    return EditFactors(edit_id, batch, {
        layer: LayerFactor(torch.randn(d_out, generator=g), torch.randn(d_in, generator=g), torch.randn(d_in, generator=g))
        for layer in (0, 1)
    })


def _store() -> FactorStore:
    g = torch.Generator().manual_seed(42)
    basis = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64)).Q
    return FactorStore({0: torch.randn(6, 10, generator=g), 1: torch.randn(6, 10, generator=g)}, {0: basis, 1: None})


def test_revert_equals_recomposition_from_scratch_and_empty_equals_w0():
    store, a, b, c = _store(), _edit("a", "b1", 1), _edit("b", "b1", 2), _edit("c", "b2", 3)
    store.add([a, b])
    store.add([c])
    store.remove("b")
    fresh = _store()
    fresh.add([a])
    fresh.add([c])
    for layer in (0, 1):
        assert torch.equal(store.composed(layer), fresh.composed(layer))
        assert torch.equal(store.prior(layer), fresh.prior(layer))
    store.remove("a")
    store.remove("c")
    for layer in (0, 1):
        assert torch.equal(store.composed(layer), store.base_weight(layer))
        assert not store.prior(layer).any()


def test_prior_is_the_sum_of_key_outer_products_in_the_basis():
    store, a, b = _store(), _edit("a", "b1", 1), _edit("b", "b2", 2)
    store.add([a])
    store.add([b])
    keys = torch.stack([a.layers[1].k, b.layers[1].k], 1).double()
    torch.testing.assert_close(store.prior(1), keys @ keys.T)
    basis = store._bases[0]
    reduced = basis.T @ torch.stack([a.layers[0].k, b.layers[0].k], 1).double()
    torch.testing.assert_close(store.prior(0), reduced @ reduced.T)


def test_composed_with_planned_changes_does_not_touch_the_store():
    store, a, b = _store(), _edit("a", "b1", 1), _edit("b", "b2", 2)
    store.add([a])
    planned = store.composed(0, extra=[b], exclude=["a"])
    assert store.edit_ids == ["a"]
    expected = store.base_weight(0) + torch.outer(b.layers[0].r, b.layers[0].a)
    torch.testing.assert_close(planned, expected)
