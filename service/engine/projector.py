"""The null-space projector of the preserved keys' second moment (alphaedit.md §1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NullSpace:
    basis: torch.Tensor  # U (d, m) float64, orthonormal columns; P = U Uᵀ
    eigenvalues: torch.Tensor  # (d,) ascending

    @property
    def kept(self) -> int:
        return self.basis.shape[1]

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.eigenvalues.shape[0]

    def projector(self) -> torch.Tensor:
        return self.basis @ self.basis.T


def null_space(second_moment: torch.Tensor, threshold: float = 2e-2, energy: float | None = None) -> NullSpace:
    """Eigenvectors of C0 whose eigenvalue is below `threshold` (absolute, the paper's rule).

    With `energy`, the rule is relative instead: keep the smallest eigen-directions whose
    eigenvalues add up to at most that share of the trace.
    """
    c0 = second_moment.double()
    c0 = (c0 + c0.T) / 2  # symmetric by construction; remove accumulated rounding asymmetry
    eigenvalues, vectors = torch.linalg.eigh(c0)  # ascending
    if energy is None:
        keep = eigenvalues < threshold
    else:
        share = torch.cumsum(eigenvalues.clamp_min(0), 0) / eigenvalues.clamp_min(0).sum().clamp_min(1e-30)
        keep = share <= energy
    return NullSpace(vectors[:, keep].contiguous(), eigenvalues)
