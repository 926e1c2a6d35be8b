"""The per-layer update as pure linear algebra (alphaedit.md §3). No model, device or I/O.

Both methods return A (d_in, n) such that ΔW = R Aᵀ = Σ_j r_j a_jᵀ, one rank-one term per request.

AlphaEdit solves (P (K Kᵀ + C_p) + λI) X = P K Rᵀ. With P = U Uᵀ the solution lies in range(U):
A = U (Uᵀ(K Kᵀ + C_p)U + λI)⁻¹ Uᵀ K, the same solution from an m×m symmetric positive-definite
system (m = null-space dimension), cheaper and better conditioned than the d×d one.
"""
from __future__ import annotations

import torch

from service.errors import EditFailed


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise EditFailed(f"{what}: the system is singular or indefinite; check the keys and the null-space threshold")
    return torch.cholesky_solve(rhs, factor)


def alphaedit_directions(
    keys: torch.Tensor, basis: torch.Tensor, prior_reduced: torch.Tensor, l2: float
) -> torch.Tensor:
    """A (d_in, n). keys K (d_in, n); basis U (d_in, m); prior_reduced Uᵀ C_p U (m, m)."""
    basis = basis.double()
    keys = keys.to(basis.device, torch.float64)
    reduced_keys = basis.T @ keys  # (m, n)
    system = reduced_keys @ reduced_keys.T + prior_reduced.double()
    system.diagonal().add_(l2)
    return basis @ _spd_solve(system, reduced_keys, "AlphaEdit solve")


def memit_directions(
    keys: torch.Tensor, second_moment: torch.Tensor, prior: torch.Tensor, mom2_weight: float
) -> torch.Tensor:
    """A (d_in, n) from (λ_m C0 + K Kᵀ + C_p) A = K."""
    keys = keys.to(second_moment.device, torch.float64)
    system = mom2_weight * second_moment.double() + keys @ keys.T + prior.double()
    return _spd_solve(system, keys, "MEMIT solve")


def residuals(targets: torch.Tensor, current: torch.Tensor, layers_left: int) -> torch.Tensor:
    """R (d_out, n) = (Z − H) / (L − i): the share of the remaining change this layer takes."""
    return ((targets.double() - current.to(targets.device, torch.float64)) / layers_left).T
