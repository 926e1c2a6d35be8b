"""Running only the delta-dependent part of each prompt through the blocks after the edit.

Positions before the subject's last token do not depend on delta, so their keys and values in
the later blocks are computed once; each optimisation step then runs just the suffix from the
lookup position on, attending to that cache. Masks are built here as 4-D additive masks (the
models take them as given), so ragged prefixes need no special support from the model code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from service.model.adapters import cache_keyword


class PrefixCache:
    """Minimal cache object: records the prefix pass, then prepends it read-only."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True
        self.is_compileable = False

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.entries[layer_idx] = (key.detach(), value.detach())
            return key, value
        past_key, past_value = self.entries[layer_idx]
        return torch.cat([past_key, key], dim=-2), torch.cat([past_value, value], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def select(self, rows: torch.Tensor) -> "PrefixCache":
        view = PrefixCache()
        view.entries = {i: (k[rows], v[rows]) for i, (k, v) in self.entries.items()}
        view.recording = False
        return view


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, q, kv) booleans -> (B, 1, q, kv) additive mask."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclass
class SuffixBatch:
    hidden: torch.Tensor  # (B, S, H): residual after the edited block, from each row's lookup on
    positions: torch.Tensor  # (B, S) absolute positions
    mask: torch.Tensor  # (B, 1, S, P + S)
    cache: PrefixCache | None
    offsets: torch.Tensor  # (B,) lookup position of each row (suffix index 0)

    def select(self, rows: torch.Tensor) -> "SuffixBatch":
        cache = self.cache.select(rows) if self.cache is not None else None
        return SuffixBatch(self.hidden[rows], self.positions[rows], self.mask[rows], cache, self.offsets[rows])


@torch.no_grad()
def split_at_lookup(tail: torch.nn.Module, hidden: torch.Tensor, lengths: torch.Tensor, lookups: torch.Tensor) -> SuffixBatch:
    """Run the prefix [0, lookup) of each row through `tail` once; return the suffix batch.

    hidden (B, T, H) right-padded; lengths, lookups (B,).
    """
    batch, device, dtype = hidden.shape[0], hidden.device, hidden.dtype
    prefix_len = int(lookups.max())
    suffix_len = int((lengths - lookups).max())
    steps = torch.arange(suffix_len, device=device)
    positions = lookups[:, None] + steps[None]  # (B, S)
    gather = positions.clamp(max=hidden.shape[1] - 1)
    suffix = hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[2]))
    causal = steps[None, :] <= steps[:, None]  # (S, S)
    allowed_suffix = causal[None].expand(batch, -1, -1)
    cache = None
    if prefix_len > 0:
        cache = PrefixCache()
        prefix_positions = torch.arange(prefix_len, device=device)
        prefix_causal = (prefix_positions[None, :] <= prefix_positions[:, None])[None].expand(batch, -1, -1)
        tail(inputs_embeds=hidden[:, :prefix_len], attention_mask=additive_mask(prefix_causal, dtype),
             position_ids=prefix_positions[None].expand(batch, -1), use_cache=True, **{cache_keyword(tail): cache})
        cache.recording = False
        allowed_prefix = (prefix_positions[None, :] < lookups[:, None])[:, None, :].expand(-1, suffix_len, -1)
        allowed_suffix = torch.cat([allowed_prefix, allowed_suffix], dim=2)
    return SuffixBatch(suffix, positions, additive_mask(allowed_suffix, dtype), cache, lookups)
