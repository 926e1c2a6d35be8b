"""The factor store: weights and key statistics as pure functions of the active edits."""
from __future__ import annotations

import torch

import pytest

from service.engine.factors import GRID_BITS, EditFactors, FactorStore, LayerFactor, on_grid


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
        assert torch.equal(store.weight_after(layer), fresh.weight_after(layer))
        torch.testing.assert_close(store.prior(layer), fresh.prior(layer), rtol=1e-12, atol=1e-12)
    store.remove("a")
    store.remove("c")
    for layer in (0, 1):
        assert torch.equal(store.weight_after(layer), store.base_weight(layer))
        assert float(store.prior(layer).abs().max()) < 1e-9


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
    planned = store.weight_after(0, store.plan(add=[b], remove=[a]))
    assert store.edit_ids == ["a"]
    expected = store.base_weight(0) + torch.outer(b.layers[0].r, b.layers[0].a)
    torch.testing.assert_close(planned, expected)


def _on_grid_edit(edit_id: str, batch: str, seed: int, scale: float) -> EditFactors:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer in (0, 1):
        r, a = on_grid(torch.randn(6, generator=g) * scale, torch.randn(10, generator=g) * scale)
        layers[layer] = LayerFactor(r, a, torch.randn(10, generator=g))
    return EditFactors(edit_id, batch, layers)


def test_sums_are_exact_in_any_order_grouping_and_after_removing_an_early_edit():
    # scales from 1e-4 to 3: tiny edits and edits large enough to force single-edit chunks
    edits = [_on_grid_edit(f"e{i}", f"b{i // 7}", i, scale) for i, scale in
             enumerate([1e-4, 3.0, 0.02, 1.0] * 10)]
    batched, single, backwards = _store(), _store(), _store()
    for b in sorted({e.batch_id for e in edits}):
        batched.add([e for e in edits if e.batch_id == b])
    for e in edits:
        single.add([e])
    backwards.add(list(reversed(edits)))
    for layer in (0, 1):
        assert torch.equal(batched._sum[layer], single._sum[layer])
        assert torch.equal(batched._sum[layer], backwards._sum[layer])
    batched.remove("e1")
    fresh = _store()
    fresh.add([e for e in edits if e.edit_id != "e1"])
    for layer in (0, 1):
        assert torch.equal(batched.weight_after(layer), fresh.weight_after(layer))
        exact = sum(e.layers[layer].r.double()[:, None] * e.layers[layer].a.double()[None] for e in edits
                    if e.edit_id != "e1")
        torch.testing.assert_close(fresh.accumulated(layer), exact, rtol=1e-15, atol=1e-13)


def test_on_grid_keeps_twenty_bits_and_products_on_the_grid():
    r, a = on_grid(torch.tensor([0.3, -1e-3, 2.0]), torch.tensor([1e-9, 5e-7, -3e-8]))
    products = r.double()[:, None] * a.double()[None] * 2.0 ** GRID_BITS
    assert torch.equal(products, torch.round(products))
    # block floating point: each entry within 2^-20 of the vector's largest
    assert float((r - torch.tensor([0.3, -1e-3, 2.0])).abs().max()) <= 2.0 * 2.0 ** -20


def test_a_store_without_factors_needs_them_to_remove_an_edit():
    store = FactorStore({0: torch.zeros(6, 10), 1: torch.zeros(6, 10)}, {0: None, 1: None}, keep_factors=False)
    a = _on_grid_edit("a", "b1", 1, 0.1)
    store.add([a])
    assert store.factors("a") is None and store.memory_bytes()["factors"] == 0
    with pytest.raises(ValueError, match="factors of edit a are needed"):
        store.remove("a")
    store.remove("a", a)
    assert not store._sum[0].any() and len(store) == 0
