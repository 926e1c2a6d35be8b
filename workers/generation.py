"""Token-by-token generation on the resident model with a KV cache and a private RNG.

A private torch.Generator per request keeps seeded sampling reproducible while other requests
run concurrently (the global RNG is shared).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import InvalidRequest
from service.model.adapters import cache_keyword
from service.inference import GenerateParams


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


@dataclass
class Step:
    text: str  # new text since the previous step ("" while a character is incomplete)
    finish_reason: str | None  # set on the last step: "length" | "stop" | "eos" (GenerateResult's values)
    tokens: int  # tokens generated so far (the end-of-sequence token not counted)


def _next_token(logits: torch.Tensor, params: GenerateParams, generator: torch.Generator | None) -> int:
    """logits (V,) float32 on CPU."""
    if not params.do_sample or params.temperature == 0:
        return int(logits.argmax())
    # Shift before scaling: a tiny temperature then sends the others to -inf, not the top one to +inf
    # (inf - inf in the softmax would be NaN). Scale in float64, where every positive temperature is
    # a number: float32 rounds one below ~1e-45 (1e-300, say) to 0, and the top logit's 0 / 0 is NaN.
    logits = (logits - logits.max()).double() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > params.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_steps(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: GenerateParams
) -> Iterator[Step]:
    """Yield the continuation step by step; the caller holds the model's read lock throughout."""
    prompt_ids = tokenizer(params.inputs, add_special_tokens=True)["input_ids"]
    if not prompt_ids:
        raise InvalidRequest("inputs tokenise to nothing")
    limit = position_limit(model)
    if limit and len(prompt_ids) + params.max_new_tokens > limit:
        raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens exceeds the model's {limit} positions")
    if params.seed is not None and not SEED_MIN <= params.seed <= SEED_MAX:
        raise InvalidRequest(f"seed {params.seed} is outside the 64-bit range [{SEED_MIN}, {SEED_MAX}]")
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    device = model.get_input_embeddings().weight.device
    cache = DynamicCache(config=model.config)
    inputs = torch.tensor([prompt_ids], device=device)
    generated: list[int] = []
    emitted = ""
    keyword = cache_keyword(model)
    for step in range(params.max_new_tokens):
        logits = model(input_ids=inputs, use_cache=True, **{keyword: cache}).logits[0, -1].float().cpu()
        token = _next_token(logits, params, generator)
        if token == tokenizer.eos_token_id:
            yield Step("", "eos", len(generated))
            return
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        stop_at = _stop_position(text, params.stop)
        if stop_at is not None:
            yield Step(text[len(emitted):stop_at] if stop_at > len(emitted) else "", "stop", len(generated))
            return
        new = text[len(emitted):] if not text.endswith("\ufffd") else ""
        emitted += new
        last = step == params.max_new_tokens - 1
        yield Step(new, "length" if last else None, len(generated))
        inputs = torch.tensor([[token]], device=device)


def position_limit(model: PreTrainedModel) -> int | None:
    """The most positions (prompt plus generated tokens) the model takes, where its config says."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def _stop_position(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def generate_text(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: GenerateParams
) -> tuple[str, str, int, int]:
    """(text, finish_reason, generated_tokens, prompt_tokens)."""
    text, reason, count = "", "length", 0
    for step in generate_steps(model, tokenizer, params):
        text, reason, count = text + step.text, step.finish_reason or reason, step.tokens
    prompt_tokens = len(tokenizer(params.inputs, add_special_tokens=True)["input_ids"])
    return text, reason, count, prompt_tokens
