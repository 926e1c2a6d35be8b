"""Context templates (alphaedit.md §2): "{}" plus short seeded continuations of fixed openings."""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.engine.prompts import CONTEXT_PREFIXES, encode
from service.engine.stats import save_atomic

log = logging.getLogger(__name__)


@torch.no_grad()
def context_templates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int = 0, length: int = 10, top_k: int = 5
) -> list[str]:
    """["{}", "<sampled text>. {}", ...]: one template per opening, top-k sampling, seeded."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = model.get_input_embeddings().weight.device
    templates = ["{}"]
    for prefix in CONTEXT_PREFIXES:
        ids = encode(tokenizer, prefix)
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            top = torch.topk(logits, top_k)
            choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
            ids.append(int(top.indices[choice]))
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("{", " ").replace("}", " ")
        templates.append(text + ". {}")
    return templates


def templates_path(cache_dir: Path, model_fingerprint: str, device: str, seed: int, length: int,
                   top_k: int = 5) -> Path:
    """Keyed by everything the sampling depends on: the weights (dtype included), the device type (a
    kernel's rounding can change a sampled token), the seed, the length, top-k and the openings."""
    key = json.dumps([device, seed, length, top_k, list(CONTEXT_PREFIXES)])
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / "templates" / f"{model_fingerprint}-{key}.pt"


def cached_context_templates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_fingerprint: str, cache_dir: Path,
    seed: int = 0, length: int = 10,
) -> list[str]:
    """`context_templates`, read from the cache when an earlier start sampled them (a hundred forward
    passes, seconds on a CPU, at every start otherwise). An unreadable file is sampled again."""
    device = model.get_input_embeddings().weight.device.type
    path = templates_path(cache_dir, model_fingerprint, device, seed, length)
    try:
        saved = torch.load(path, weights_only=True)
        if (isinstance(saved, list) and len(saved) == len(CONTEXT_PREFIXES) + 1 and saved[0] == "{}"
                and all(isinstance(t, str) for t in saved)):
            return saved
        log.warning("context templates cache %s holds no templates; sampling them again", path)
    except FileNotFoundError:
        pass
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        log.warning("context templates cache %s unreadable (%s); sampling them again", path, exc)
    templates = context_templates(model, tokenizer, seed, length)
    save_atomic(templates, path)
    return templates
