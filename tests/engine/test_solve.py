"""The update's linear algebra on small random matrices: the paper's formula, the null-space guarantee."""
from __future__ import annotations

import pytest
import torch

from service.engine import solve
from service.engine.projector import null_space
from service.errors import EditFailed


def _setup(d: int = 24, n: int = 3, preserved: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(d, preserved, generator=g, dtype=torch.float64)  # preserved keys span 16 of 24 dims
    c0 = k0 @ k0.T / preserved
    keys = torch.randn(d, n, generator=g, dtype=torch.float64)
    prior_keys = torch.randn(d, 5, generator=g, dtype=torch.float64)
    return k0, c0, keys, prior_keys @ prior_keys.T


def test_reduced_alphaedit_solve_equals_the_papers_formula():
    k0, c0, keys, prior = _setup()
    ns = null_space(c0, threshold=1e-8)
    p = ns.projector()
    l2 = 10.0
    reference = torch.linalg.solve(p @ (keys @ keys.T + prior) + l2 * torch.eye(24, dtype=torch.float64), p @ keys)
    ours = solve.alphaedit_directions(keys, ns.basis, ns.basis.T @ prior @ ns.basis, l2)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-10)


def test_alphaedit_update_leaves_preserved_keys_alone():
    k0, c0, keys, prior = _setup()
    ns = null_space(c0, threshold=1e-8)
    assert ns.kept == 8  # 24 dims, preserved keys span 16
    resid = torch.randn(12, 3, dtype=torch.float64)
    alpha = resid @ solve.alphaedit_directions(keys, ns.basis, ns.basis.T @ prior @ ns.basis, 10.0).T
    assert (alpha @ k0).norm() < 1e-9 * alpha.norm() * k0.norm()
    assert (alpha @ keys).norm() > 1e-3 * alpha.norm() * keys.norm()  # the edited keys do move


def test_memit_solve_is_the_papers_formula():
    _, c0, keys, prior = _setup()
    reference = torch.linalg.solve(15000.0 * c0 + keys @ keys.T + prior, keys)
    torch.testing.assert_close(solve.memit_directions(keys, c0, prior, 15000.0), reference)


def test_energy_criterion_keeps_the_weakest_directions():
    eigenvalues = torch.tensor([1e-4, 1e-3, 1e-2, 1.0, 10.0], dtype=torch.float64)
    c0 = torch.diag(eigenvalues)
    ns = null_space(c0, energy=1e-3)
    assert ns.kept == 2 and ns.kept_fraction == pytest.approx(0.4)
    assert null_space(c0, threshold=2e-2).kept == 3


def test_singular_system_fails_the_edit_with_a_reason():
    _, c0, keys, _ = _setup()
    with pytest.raises(EditFailed, match="singular"):
        solve.memit_directions(keys, torch.zeros_like(c0), torch.zeros_like(c0), 1.0)


def test_residual_is_split_over_the_remaining_layers():
    z, h = torch.tensor([[4.0, 8.0]]), torch.tensor([[0.0, 2.0]])
    assert solve.residuals(z, h, 2).tolist() == [[2.0], [3.0]]
