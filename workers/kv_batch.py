"""Sequences decoded together: one KV cache, left-padded to a common length, and its attention mask.

Row r's cached position t holds a real token where mask[r, t] == 1; the others are holes (left
padding, or the padding of a prompt chunk shorter than the block it was fed in) that no query
attends to. Position ids count a row's real tokens only, so each row computes what it would alone,
up to float rounding. Rows leave with `select` and join with `concat`; both copy the cache once,
the steps in between only append to it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from service.model.adapters import cache_keyword


class PaddedBatch:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # (B, T) long: 1 where the cache holds a real token

    @classmethod
    def fresh(cls, rows: int, device: torch.device) -> "PaddedBatch":
        """Rows with nothing cached yet."""
        return cls(DynamicCache(), torch.zeros((rows, 0), dtype=torch.long, device=device))

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @torch.no_grad()
    def forward(self, base: nn.Module, ids: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
        """Feed a block of W new positions per row, right-aligned real tokens after holes; the cache
        and mask grow by W. base: the decoder stack (final norm included); ids, block_mask (B, W).
        Returns the last hidden states (B, W, H)."""
        positions = self.mask.sum(1, keepdim=True) + block_mask.cumsum(1) - 1  # (B, W): real tokens before
        mask = torch.cat([self.mask, block_mask], 1)  # (B, T + W)
        holes = not bool(mask.all())  # without any, the model's own causal path (no mask tensor) is exact and faster
        out = base(input_ids=ids, attention_mask=mask if holes else None, position_ids=positions.clamp_min(0),
                   use_cache=True, **{cache_keyword(base): self.cache})
        self.mask = mask
        return out.last_hidden_state

    def select(self, keep: Sequence[int]) -> "PaddedBatch":
        """The rows `keep`, in that order, without the leading positions that are holes in all of them."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        real = mask.any(0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        layers = [(k[index, :, start:], v[index, :, start:]) for k, v in _layers(self.cache)]
        return PaddedBatch(_cache(layers), mask[:, start:])

    @staticmethod
    def concat(first: "PaddedBatch | None", second: "PaddedBatch") -> "PaddedBatch":
        """first's rows then second's, the shorter left-padded with holes."""
        if first is None or first.rows == 0:
            return second
        length = max(first.length, second.length)
        shapes = _layers(first.cache) or _layers(second.cache)  # a fresh batch has no tensors yet
        parts = [_padded(b, length, shapes) for b in (first, second)]
        layers = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*(p[0] for p in parts))]
        mask = torch.cat([p[1] for p in parts])
        return PaddedBatch(_cache(layers), mask)


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (B, heads, T, head_dim); [] before the first forward."""
    return [(layer.keys, layer.values) for layer in cache.layers if getattr(layer, "is_initialized", False)]


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()


def _padded(batch: PaddedBatch, length: int,
            shapes: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """batch's layers and mask left-padded with holes to `length`; `shapes`: layers to copy the
    heads, head size, dtype and device from when batch has none yet."""
    pad = length - batch.length
    mask = F.pad(batch.mask, (pad, 0))
    own = _layers(batch.cache)
    if own:
        return [(F.pad(k, (0, 0, pad, 0)), F.pad(v, (0, 0, pad, 0))) for k, v in own], mask
    rows = batch.rows
    return [(k.new_zeros((rows, k.shape[1], length, k.shape[3])), v.new_zeros((rows, v.shape[1], length, v.shape[3])))
            for k, v in shapes], mask
