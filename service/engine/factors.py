"""Active edits as rank-one factors; edited weights and key statistics as pure functions of them.

W_l = W0_l + Σ_{active j, ledger order} r_{j,l} a_{j,l}ᵀ, always recomposed from W0 in float32,
so applying, reverting and replaying the same set gives the same bits. C_p_l = Σ over batches
(in order) of K_b K_bᵀ, kept in the solve's basis; a revert recomputes it from the stored keys.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerFactor:
    r: torch.Tensor  # (d_out,) float32
    a: torch.Tensor  # (d_in,) float32
    k: torch.Tensor  # (d_in,) float32: the key, for C_p


@dataclass(frozen=True)
class EditFactors:
    edit_id: str
    batch_id: str
    layers: dict[int, LayerFactor]


class FactorStore:
    """The active edits of one model, in ledger order."""

    def __init__(self, base_weights: dict[int, torch.Tensor], bases: dict[int, torch.Tensor | None]) -> None:
        self._base = {layer: w.detach().float().clone() for layer, w in base_weights.items()}  # (d_out, d_in)
        self._bases = bases  # per layer: U (d_in, m) for AlphaEdit, None for the full space (MEMIT)
        self._edits: dict[str, EditFactors] = {}
        self._prior = {layer: self._zero_prior(layer) for layer in self._base}

    @property
    def layers(self) -> list[int]:
        return list(self._base)

    @property
    def edit_ids(self) -> list[str]:
        return list(self._edits)

    def __len__(self) -> int:
        return len(self._edits)

    def __contains__(self, edit_id: str) -> bool:
        return edit_id in self._edits

    def base_weight(self, layer: int) -> torch.Tensor:
        return self._base[layer]

    def prior(self, layer: int) -> torch.Tensor:
        """C_p in the layer's basis: Uᵀ C_p U (m, m), or C_p (d_in, d_in). float64."""
        return self._prior[layer]

    def add(self, edits: Iterable[EditFactors]) -> None:
        """Append edits that form one batch (or replay one batch): C_p += K_b K_bᵀ."""
        edits = list(edits)
        duplicate = [e.edit_id for e in edits if e.edit_id in self._edits]
        if duplicate:
            raise ValueError(f"edits already active: {duplicate}")
        for edit in edits:
            self._edits[edit.edit_id] = edit
        for layer in self._base:
            self._prior[layer] = self._prior[layer] + self._batch_prior(layer, edits)

    def remove(self, edit_id: str) -> EditFactors:
        edit = self._edits.pop(edit_id)
        self._recompute_prior()
        return edit

    def composed(self, layer: int, extra: Iterable[EditFactors] = (), exclude: Iterable[str] = ()) -> torch.Tensor:
        """W0 + R Aᵀ over the active edits (minus `exclude`, plus `extra` appended), float32, from scratch."""
        excluded = set(exclude)
        edits = [e for e in self._edits.values() if e.edit_id not in excluded] + list(extra)
        base = self._base[layer]
        if not edits:
            return base.clone()
        r = torch.stack([e.layers[layer].r for e in edits], dim=1)  # (d_out, N)
        a = torch.stack([e.layers[layer].a for e in edits], dim=1)  # (d_in, N)
        return base + (r.to(base.device) @ a.to(base.device).T)

    def _zero_prior(self, layer: int) -> torch.Tensor:
        basis = self._bases.get(layer)
        size = basis.shape[1] if basis is not None else self._base[layer].shape[1]
        return torch.zeros(size, size, dtype=torch.float64, device=self._base[layer].device)

    def _batch_prior(self, layer: int, edits: list[EditFactors]) -> torch.Tensor:
        if not edits:
            return self._zero_prior(layer)
        device = self._base[layer].device
        keys = torch.stack([e.layers[layer].k for e in edits], dim=1).to(device, torch.float64)  # (d_in, n)
        basis = self._bases.get(layer)
        if basis is not None:
            keys = basis.T.to(device, torch.float64) @ keys  # (m, n)
        return keys @ keys.T

    def _recompute_prior(self) -> None:
        batches: dict[str, list[EditFactors]] = {}
        for edit in self._edits.values():  # dicts keep ledger order
            batches.setdefault(edit.batch_id, []).append(edit)
        for layer in self._base:
            prior = self._zero_prior(layer)
            for batch in batches.values():
                prior = prior + self._batch_prior(layer, batch)
            self._prior[layer] = prior
