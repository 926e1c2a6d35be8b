"""Active edits as rank-one factors; edited weights and key statistics as pure functions of them.

W_l = W0_l + Σ_{active j} r_{j,l} a_{j,l}ᵀ, summed EXACTLY. Each factor pair is put on a grid when
the edit is computed (`on_grid`: r to 20 significant bits, a too unless that would make r aᵀ finer
than 2^-52), so every product r_i a_k is an exact multiple of 2^-52 that float64 holds exactly. The
store keeps Σ r aᵀ as int64 multiples of 2^-52: adding a batch, removing any one edit and replaying
the ledger from scratch give the same integers in any order or grouping, hence the same float32
weights bit for bit, at a cost that does not grow with the number of active edits. A bulk replay
is a few float64 matmuls, chunked so that no partial sum can leave float64's exact range.

C_p_l = Σ_{active j} k_{j,l} k_{j,l}ᵀ (in the solve's basis) is a float64 sum, updated by adding and
subtracting terms: exact up to float64 rounding, not bit for bit. It only shapes future edits, and
those are recorded as factors, so the weights stay a pure function of the ledger.

Per edit the store keeps nothing but its id and batch unless `keep_factors` is set: factors live in
the ledger, which hands an edit's own factors back when it is rolled back.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

GRID_BITS = 52  # Σ r aᵀ is kept in units of 2^-52; |ΔW| up to 2^11 fits int64
MANTISSA_BITS = 20  # significant bits kept of r and a: products need 40, float64 holds 53
_CHUNK_BOUND = 1.0  # per chunk, Σ max|r| max|a| < 2^(53-52) keeps every partial sum exact


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


def _exponent(x: torch.Tensor) -> int:
    """e with 2^(e-1) <= max|x| < 2^e (0 for a zero vector)."""
    peak = float(x.abs().max()) if x.numel() else 0.0
    return int(torch.frexp(torch.tensor(peak, dtype=torch.float64)).exponent) if peak > 0 else 0


def _round_to(x: torch.Tensor, exponent: int) -> torch.Tensor:
    step = 2.0 ** exponent
    return (torch.round(x.double() / step) * step).float()


def on_grid(r: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, a) rounded so that every r_i a_k is an exact multiple of 2^-GRID_BITS (see module doc)."""
    e_r = _exponent(r) - MANTISSA_BITS
    e_a = max(_exponent(a) - MANTISSA_BITS, -GRID_BITS - e_r)
    return _round_to(r, e_r), _round_to(a, e_a)


@dataclass
class Change:
    """A planned change of the store: integer weight deltas and prior deltas per layer."""

    add: list[EditFactors]
    remove: list[EditFactors]
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # int64 multiples of 2^-GRID_BITS
    priors: dict[int, torch.Tensor] = field(default_factory=dict)  # float64


class FactorStore:
    """The active edits of one model, in ledger order, as exact sums."""

    def __init__(self, base_weights: dict[int, torch.Tensor], bases: dict[int, torch.Tensor | None],
                 keep_factors: bool = True) -> None:
        self._base = {layer: w.detach().float().clone() for layer, w in base_weights.items()}  # (d_out, d_in)
        self._bases = bases  # per layer: U (d_in, m) for AlphaEdit, None for the full space (MEMIT)
        self.keep_factors = keep_factors
        self._batch_of: dict[str, str] = {}  # active edit id -> batch id, in ledger order
        self._factors: dict[str, EditFactors] = {}  # only with keep_factors
        self._sum = {layer: torch.zeros_like(w, dtype=torch.int64) for layer, w in self._base.items()}
        self._prior = {layer: self._zero_prior(layer) for layer in self._base}

    @property
    def layers(self) -> list[int]:
        return list(self._base)

    @property
    def edit_ids(self) -> list[str]:
        return list(self._batch_of)

    def __len__(self) -> int:
        return len(self._batch_of)

    def __contains__(self, edit_id: str) -> bool:
        return edit_id in self._batch_of

    def base_weight(self, layer: int) -> torch.Tensor:
        return self._base[layer]

    def prior(self, layer: int) -> torch.Tensor:
        """C_p in the layer's basis: Uᵀ C_p U (m, m), or C_p (d_in, d_in). float64."""
        return self._prior[layer]

    def accumulated(self, layer: int) -> torch.Tensor:
        """D = Σ r aᵀ over the active edits (d_out, d_in), float64."""
        return self._sum[layer].double() * 2.0 ** -GRID_BITS

    def factors(self, edit_id: str) -> EditFactors | None:
        """An active edit's factors, if this store keeps them."""
        return self._factors.get(edit_id)

    def memory_bytes(self) -> dict[str, int]:
        """What the store holds: the fixed-size sums, and what grows with the active edits."""
        fixed = sum(t.numel() * t.element_size() for t in [*self._sum.values(), *self._prior.values()])
        kept = sum(f.numel() * f.element_size() for e in self._factors.values() for lf in e.layers.values()
                   for f in (lf.r, lf.a, lf.k))
        # an estimate, not a measurement: two short strings and a dict slot per edit
        index = sum(len(i) + len(b) + 100 for i, b in self._batch_of.items())
        return {"sums": fixed, "factors": kept, "index": index, "edits": len(self)}

    # ---- changes ----------------------------------------------------------------------------

    def plan(self, add: Sequence[EditFactors] = (), remove: Sequence[EditFactors] = ()) -> Change:
        """The change that appends `add` and removes `remove` (active edits, with their factors)."""
        duplicate = [e.edit_id for e in add if e.edit_id in self._batch_of]
        if duplicate:
            raise ValueError(f"edits already active: {duplicate}")
        missing = [e.edit_id for e in remove if e.edit_id not in self._batch_of]
        if missing:
            raise ValueError(f"edits not active: {missing}")
        change = Change(list(add), list(remove))
        for layer in self.layers:
            change.weights[layer] = self._weight_sum(layer, add) - self._weight_sum(layer, remove)
            change.priors[layer] = self._prior_sum(layer, add) - self._prior_sum(layer, remove)
        return change

    def weight_after(self, layer: int, change: Change | None = None) -> torch.Tensor:
        """W0 + Σ r aᵀ, float32, with `change` applied (the store is not touched)."""
        total = self._sum[layer] if change is None else self._sum[layer] + change.weights[layer]
        return (self._base[layer].double() + total.double() * 2.0 ** -GRID_BITS).float()

    def apply(self, change: Change) -> None:
        for layer in self.layers:
            self._sum[layer] += change.weights[layer]
            self._prior[layer] += change.priors[layer]
        for edit in change.remove:
            del self._batch_of[edit.edit_id]
            self._factors.pop(edit.edit_id, None)
        for edit in change.add:
            self._batch_of[edit.edit_id] = edit.batch_id
            if self.keep_factors:
                self._factors[edit.edit_id] = edit

    def add(self, edits: Iterable[EditFactors]) -> None:
        self.apply(self.plan(add=list(edits)))

    def remove(self, edit_id: str, factors: EditFactors | None = None) -> EditFactors:
        edit = factors or self._factors.get(edit_id)
        if edit is None or edit.edit_id != edit_id:
            raise ValueError(f"the factors of edit {edit_id} are needed to remove it (this store does not keep them)")
        self.apply(self.plan(remove=[edit]))
        return edit

    def state(self) -> dict:
        """The sums and the index, for a snapshot (plain tensors, strings and lists)."""
        return {"sums": {int(k): v.cpu() for k, v in self._sum.items()},
                "priors": {int(k): v.cpu() for k, v in self._prior.items()},
                "index": [[e, b] for e, b in self._batch_of.items()]}

    def restore(self, state: dict) -> None:
        """Take a snapshot's sums and index (the store must hold no edits yet)."""
        if self._batch_of:
            raise ValueError("restore needs an empty store")
        if set(state["sums"]) != set(self.layers):
            raise ValueError(f"the snapshot holds layers {sorted(state['sums'])}, this store {self.layers}")
        for layer in self.layers:
            device = self._base[layer].device
            self._sum[layer] = state["sums"][layer].to(device, torch.int64)
            self._prior[layer] = state["priors"][layer].to(device, torch.float64)
        self._batch_of = {edit_id: batch_id for edit_id, batch_id in state["index"]}

    # ---- the sums -----------------------------------------------------------------------------

    def _weight_sum(self, layer: int, edits: Sequence[EditFactors]) -> torch.Tensor:
        total = torch.zeros_like(self._sum[layer])
        device = self._base[layer].device
        for chunk in _exact_chunks(edits, layer):
            r = torch.stack([e.layers[layer].r for e in chunk], dim=1).to(device, torch.float64)  # (d_out, n)
            a = torch.stack([e.layers[layer].a for e in chunk], dim=1).to(device, torch.float64)  # (d_in, n)
            scaled = (r @ a.T) * 2.0 ** GRID_BITS
            if not bool(torch.isfinite(scaled).all()) or float(scaled.abs().max()) >= 2.0 ** 62:
                raise OverflowError("an edit's update is outside the range of the factor store")
            total += torch.round(scaled).to(torch.int64)  # a no-op round for factors on the grid
        return total

    def _prior_sum(self, layer: int, edits: Sequence[EditFactors]) -> torch.Tensor:
        if not edits:
            return torch.zeros_like(self._prior[layer])
        device = self._base[layer].device
        keys = torch.stack([e.layers[layer].k for e in edits], dim=1).to(device, torch.float64)  # (d_in, n)
        basis = self._bases.get(layer)
        if basis is not None:
            keys = basis.T.to(device, torch.float64) @ keys  # (m, n)
        return keys @ keys.T

    def _zero_prior(self, layer: int) -> torch.Tensor:
        basis = self._bases.get(layer)
        size = basis.shape[1] if basis is not None else self._base[layer].shape[1]
        return torch.zeros(size, size, dtype=torch.float64, device=self._base[layer].device)


def _exact_chunks(edits: Sequence[EditFactors], layer: int) -> Iterator[list[EditFactors]]:
    """Consecutive edits whose Σ max|r| max|a| stays under the bound: within a chunk, any partial
    sum of r aᵀ terms is a multiple of 2^-52 below 2^1 in magnitude, which float64 holds exactly."""
    chunk: list[EditFactors] = []
    bound = 0.0
    for edit in edits:
        f = edit.layers[layer]
        size = float(f.r.abs().max()) * float(f.a.abs().max()) if f.r.numel() and f.a.numel() else 0.0
        if chunk and bound + size >= _CHUNK_BOUND:
            yield chunk
            chunk, bound = [], 0.0
        chunk.append(edit)
        bound += size
    if chunk:
        yield chunk
