"""Preserved-knowledge statistics: C0 = E[k kᵀ] of the edited modules' inputs over a corpus.

Streamed in packed batches of bounded size, with the forward pass stopping after the last
edited layer; cached on disk per (model, layer, corpus, budget, sequence length).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from service.engine.corpus import Corpus, packed_batches
from service.engine.trace import LayerTrace
from service.model.adapters import ModelAdapter

log = logging.getLogger(__name__)


def cache_path(cache_dir: Path, model_fingerprint: str, layer: int, corpus_fingerprint: str,
               budget: int, seq_len: int) -> Path:
    return cache_dir / "stats" / f"{model_fingerprint}-L{layer}-{corpus_fingerprint}-{budget}-{seq_len}.pt"


@torch.no_grad()
def collect_second_moments(
    adapter: ModelAdapter,
    trace: LayerTrace,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    layers: Iterable[int],
    budget: int,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    on_tokens: Callable[[int], None] = lambda n: None,
) -> dict[int, torch.Tensor]:
    """C0 per layer (d_in, d_in) float64, averaged over every token of the first `budget` tokens."""
    layers = sorted(layers)
    device = adapter.head.weight.device
    prefix = adapter.slice(0, layers[-1] + 1)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    separator = tokenizer.eos_token_id
    batches = packed_batches(corpus.documents(tokenizer), seq_len, batch_size, budget, separator)
    with tqdm(total=budget, unit="tok", desc="key statistics", disable=not progress, mininterval=2) as bar:
        for ids in batches:
            with trace.tracing(capture=layers) as captured:
                prefix(input_ids=ids.to(device))
            for layer in layers:
                keys = captured[layer].reshape(-1, captured[layer].shape[-1]).float()  # (tokens, d_in)
                moment = (keys.T @ keys).double().cpu()
                sums[layer] = sums[layer] + moment if layer in sums else moment
            count += ids.numel()
            bar.update(ids.numel())
            on_tokens(ids.numel())
    if count == 0:
        raise ValueError("the corpus produced no tokens")
    log.info("key statistics over %d tokens for layers %s", count, layers)
    return {layer: sums[layer] / count for layer in layers}


def cached_second_moments(
    adapter: ModelAdapter,
    trace: LayerTrace,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    layers: Iterable[int],
    *,
    model_fingerprint: str,
    cache_dir: Path,
    budget: int,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    on_tokens: Callable[[int], None] = lambda n: None,
) -> dict[int, torch.Tensor]:
    """As `collect_second_moments`, reusing and filling the on-disk cache per layer."""
    paths = {
        layer: cache_path(cache_dir, model_fingerprint, layer, corpus.fingerprint, budget, seq_len)
        for layer in layers
    }
    result = {layer: torch.load(path) for layer, path in paths.items() if path.is_file()}
    missing = [layer for layer in paths if layer not in result]
    if missing:
        fresh = collect_second_moments(adapter, trace, tokenizer, corpus, missing, budget, seq_len, batch_size, progress,
                                       on_tokens)
        for layer, moment in fresh.items():
            save_atomic(moment, paths[layer])
        result.update(fresh)
    return result


def save_atomic(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)
