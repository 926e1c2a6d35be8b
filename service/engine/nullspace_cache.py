"""The null-space eigendecompositions, cached beside the key statistics they come from.

The key is the statistics file's (model, layer, corpus, budget, sequence length) plus the rule
that picks the null space (threshold or energy), so a warm start loads U and the eigenvalues
instead of redoing `eigh` on every (d_in, d_in) second moment.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from service.engine.projector import NullSpace, null_space
from service.engine.stats import save_atomic

log = logging.getLogger(__name__)


def null_space_path(stats_path: Path, threshold: float, energy: float | None) -> Path:
    rule = f"t{threshold!r}" if energy is None else f"e{energy!r}"
    return stats_path.with_name(f"{stats_path.stem}-nullspace-{rule}.pt")


def cached_null_spaces(second_moments: dict[int, torch.Tensor], stats_paths: dict[int, Path], threshold: float,
                       energy: float | None, device: torch.device,
                       on_layer: Callable[[], None] = lambda: None) -> dict[int, NullSpace]:
    """`null_space` per layer, computed on `device` (as the editor would) or loaded from its cache file."""
    result: dict[int, NullSpace] = {}
    for layer, moment in second_moments.items():
        path = null_space_path(stats_paths[layer], threshold, energy)
        if path.is_file():
            saved = torch.load(path)
            result[layer] = NullSpace(saved["basis"].to(device), saved["eigenvalues"].to(device))
        else:
            ns = null_space(moment.to(device), threshold, energy)
            save_atomic({"basis": ns.basis.cpu(), "eigenvalues": ns.eigenvalues.cpu()}, path)
            result[layer] = ns
        on_layer()
    return result
