"""Context templates (alphaedit.md §2): "{}" plus short seeded continuations of fixed openings."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.engine.prompts import CONTEXT_PREFIXES, encode


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
