"""Decoding one sequence: the checks a request must pass, the next-token choice with a private RNG,
and the text, stop and end handling; `generate_text` is the plain one-sequence loop, the reference
that the batched decoder (workers/batching.py) reproduces.

A private torch.Generator per request keeps seeded sampling reproducible whatever else is decoded
beside it (the global RNG is shared).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import InvalidRequest
from service.inference import GenerateParams
from service.model.adapters import cache_keyword

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


@dataclass
class Step:
    text: str  # new text since the previous step ("" while a character is incomplete)
    finish_reason: str | None  # set on the last step: "length" | "stop" | "eos" (GenerateResult's values)
    tokens: int  # tokens generated so far (the end-of-sequence token not counted)


def prompt_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: GenerateParams) -> list[int]:
    """The prompt's token ids; InvalidRequest when the request cannot be served as given."""
    ids = list(tokenizer(params.inputs, add_special_tokens=True)["input_ids"])
    if not ids:
        raise InvalidRequest("inputs tokenise to nothing")
    limit = position_limit(model)
    if limit and len(ids) + params.max_new_tokens > limit:
        raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_new_tokens exceeds the model's {limit} positions")
    if params.seed is not None and not SEED_MIN <= params.seed <= SEED_MAX:
        raise InvalidRequest(f"seed {params.seed} is outside the 64-bit range [{SEED_MIN}, {SEED_MAX}]")
    return ids


def request_generator(params: GenerateParams) -> torch.Generator | None:
    """The request's own RNG, seeded; None (the global RNG) when it has no seed."""
    return torch.Generator().manual_seed(params.seed) if params.seed is not None else None


def next_token(logits: torch.Tensor, params: GenerateParams, generator: torch.Generator | None) -> int:
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


class TextTracker:
    """A sequence's tokens turned into Steps: text held back while a character is incomplete, the
    stop sequences, the end-of-sequence token and the max_new_tokens limit."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: GenerateParams) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.generated: list[int] = []
        self.emitted = ""  # text handed out by non-final steps
        self.text = ""  # everything handed out, the final step's text included

    def push(self, token: int) -> Step:
        step = self._step(token)
        self.text += step.text
        return step

    def _step(self, token: int) -> Step:
        if token == self.tokenizer.eos_token_id:
            return Step("", "eos", len(self.generated))
        self.generated.append(token)
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        stop_at = _stop_position(text, self.params.stop)
        if stop_at is not None:
            return Step(text[len(self.emitted):stop_at] if stop_at > len(self.emitted) else "", "stop",
                        len(self.generated))
        new = text[len(self.emitted):] if not text.endswith("\ufffd") else ""
        self.emitted += new
        last = len(self.generated) == self.params.max_new_tokens
        return Step(new, "length" if last else None, len(self.generated))


@torch.no_grad()
def generate_steps(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: GenerateParams
) -> Iterator[Step]:
    """Yield the continuation step by step, one sequence alone; the caller holds the model's read lock."""
    ids = prompt_ids(model, tokenizer, params)
    generator = request_generator(params)
    tracker = TextTracker(tokenizer, params)
    device = model.get_input_embeddings().weight.device
    cache = DynamicCache(config=model.config)
    inputs = torch.tensor([ids], device=device)
    keyword = cache_keyword(model)
    for _ in range(params.max_new_tokens):
        logits = model(input_ids=inputs, use_cache=True, **{keyword: cache}).logits[0, -1].float().cpu()
        token = next_token(logits, params, generator)
        step = tracker.push(token)
        yield step
        if step.finish_reason:
            return
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
    """(text, finish_reason, generated_tokens, prompt_tokens), one sequence alone."""
    text, reason, count = "", "length", 0
    for step in generate_steps(model, tokenizer, params):
        text, reason, count = text + step.text, step.finish_reason or reason, step.tokens
    prompt_tokens = len(tokenizer(params.inputs, add_special_tokens=True)["input_ids"])
    return text, reason, count, prompt_tokens
