"""The per-layer update as pure linear algebra (alphaedit.md §3). No model, device or I/O.

Both methods return A (d_in, n) such that ΔW = R Aᵀ = Σ_j r_j a_jᵀ, one rank-one term per request.

AlphaEdit solves (P (K Kᵀ + C_p) + λI) X = P K Rᵀ. With P = U Uᵀ the solution lies in range(U):
A = U (Uᵀ(K Kᵀ + C_p)U + λI)⁻¹ Uᵀ K, the same solution from an m×m symmetric positive-definite
system (m = null-space dimension), cheaper and better conditioned than the d×d one.

Norm control (ENCORE's Frobenius constraint, in factor form). The published term μ‖W − W0‖² =
μ‖D + ΔW‖² over an unrestricted ΔW would add −μ D (…)⁻¹, a full-rank rewrite of every earlier edit.
Optimised over updates of the batch's own form ΔW = R Aᵀ instead, its minimiser is

    (M + μI) A (RᵀR) = K (RᵀR) − μ Dᵀ R   →   A = (M + μI)⁻¹ (K − μ Dᵀ R (RᵀR)⁻¹)

(M the method's system matrix, and for AlphaEdit everything inside range(U)): each new edit pays
back the accumulated update D along the output directions it writes, in its own rank-one terms,
so every edit stays one revertible term and the weights a pure function of the ledger.
"""
from __future__ import annotations

import torch

from service.errors import EditFailed


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise EditFailed(f"{what}: the system is singular or indefinite; check the keys and the null-space threshold")
    return torch.cholesky_solve(rhs, factor)


def norm_pull(accumulated: torch.Tensor, resid: torch.Tensor, penalty: float) -> torch.Tensor | None:
    """μ Dᵀ R (RᵀR)⁺ (d_in, n): the accumulated update D (d_out, d_in) seen along the batch's
    residuals R (d_out, n); None when there is no penalty or nothing accumulated yet."""
    if penalty <= 0 or not bool(accumulated.any()):
        return None
    resid = resid.double()
    gram = resid.T @ resid
    gram.diagonal().add_(1e-9 * float(gram.diagonal().mean()) + 1e-30)  # n > d_out makes it singular
    projected = accumulated.to(resid.device, torch.float64).T @ resid  # (d_in, n)
    return penalty * torch.linalg.solve(gram, projected.T).T


def alphaedit_directions(
    keys: torch.Tensor, basis: torch.Tensor, prior_reduced: torch.Tensor, l2: float,
    penalty: float = 0.0, pull: torch.Tensor | None = None,
) -> torch.Tensor:
    """A (d_in, n). keys K (d_in, n); basis U (d_in, m); prior_reduced Uᵀ C_p U (m, m);
    `pull` from `norm_pull` with the same `penalty`."""
    basis = basis.double()
    keys = keys.to(basis.device, torch.float64)
    reduced_keys = basis.T @ keys  # (m, n)
    system = reduced_keys @ reduced_keys.T + prior_reduced.double()
    system.diagonal().add_(l2 + penalty)
    rhs = reduced_keys if pull is None else reduced_keys - basis.T @ pull.to(basis.device, torch.float64)
    return basis @ _spd_solve(system, rhs, "AlphaEdit solve")


def memit_directions(
    keys: torch.Tensor, second_moment: torch.Tensor, prior: torch.Tensor, mom2_weight: float,
    penalty: float = 0.0, pull: torch.Tensor | None = None,
) -> torch.Tensor:
    """A (d_in, n) from (λ_m C0 + K Kᵀ + C_p + μI) A = K − pull."""
    keys = keys.to(second_moment.device, torch.float64)
    system = mom2_weight * second_moment.double() + keys @ keys.T + prior.double()
    system.diagonal().add_(penalty)
    rhs = keys if pull is None else keys - pull.to(keys.device, torch.float64)
    return _spd_solve(system, rhs, "MEMIT solve")


def residuals(targets: torch.Tensor, current: torch.Tensor, layers_left: int) -> torch.Tensor:
    """R (d_out, n) = (Z − H) / (L − i): the share of the remaining change this layer takes."""
    return ((targets.double() - current.to(targets.device, torch.float64)) / layers_left).T
