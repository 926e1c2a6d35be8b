"""Sources of preserved-knowledge text, as token-id documents, and their packing into batches."""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from service.model.adapters import cache_keyword

log = logging.getLogger(__name__)

# Openings for the model's own text: varied registers and topics, so the keys it produces
# cover ordinary language rather than one genre. Fixed, so the corpus is reproducible.
SELF_PROMPTS = (
    "The history of", "In mathematics,", "The city of", "Scientists have discovered", "My favourite recipe",
    "The company announced", "In the year", "The river", "According to the report,", "She was born in",
    "The game", "A new study", "The album", "Football is", "The war", "Music", "The president said",
    "The weather", "Computers", "The novel", "In biology,", "The museum", "The election", "He played",
    "The film", "Once upon a time", "The capital of", "The team", "The language", "Economics",
    "The church", "The university", "Chemistry", "The mountain", "The king", "The song", "Water is",
    "The first", "Many people", "The island", "The army", "Art", "The law", "The road", "Physics",
    "The book", "During the", "The population of", "The school", "The ship",
)


class Corpus(Protocol):
    fingerprint: str

    def documents(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]: ...


class TextCorpus:
    """A text file, or every *.txt file under a folder (sorted), read in bounded chunks."""

    def __init__(self, path: str | Path, chunk_chars: int = 20_000) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"corpus {self.path} does not exist")
        self.files = sorted(self.path.rglob("*.txt")) if self.path.is_dir() else [self.path]
        if not self.files:
            raise FileNotFoundError(f"no .txt files under {self.path}")
        self.chunk_chars = chunk_chars
        self.fingerprint = self._digest()

    def _digest(self) -> str:
        h = hashlib.sha256()
        for file in self.files:
            h.update(file.name.encode())
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return "text-" + h.hexdigest()[:16]

    def documents(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
        for file in self.files:
            with file.open(encoding="utf-8", errors="replace") as f:
                while chunk := f.read(self.chunk_chars):
                    yield list(tokenizer(chunk, add_special_tokens=False)["input_ids"])


class SelfGeneratedCorpus:
    """Text the model samples itself from fixed, seeded openings: needs no file or download."""

    def __init__(self, model: PreTrainedModel, model_fingerprint: str, seed: int = 0,
                 tokens_per_document: int = 128, batch_size: int = 100, top_p: float = 0.95) -> None:
        self.model = model
        self.seed = seed
        self.tokens_per_document = tokens_per_document
        self.batch_size = batch_size
        self.top_p = top_p
        # "nucleus-v2": the sampler below; the text of the earlier one (generate's own) is not reused
        settings = (f"{model_fingerprint}:{seed}:{tokens_per_document}:{batch_size}:{top_p}:nucleus-v2:"
                    f"{'|'.join(SELF_PROMPTS)}")
        self.fingerprint = "self-" + hashlib.sha256(settings.encode()).hexdigest()[:16]

    def documents(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
        batches = 0
        while True:  # the caller's token budget ends it
            first = batches * self.batch_size  # the openings, cycled: a batch may hold one several times
            prompts = tuple(SELF_PROMPTS[(first + i) % len(SELF_PROMPTS)] for i in range(self.batch_size))
            began = time.perf_counter()
            documents = list(self._sample(tokenizer, prompts, self.seed * 1_000_003 + batches * 1009))
            batches += 1
            log.info("self corpus: batch %d generated, %d documents, %d tokens in %.1f s", batches,
                     len(documents), sum(map(len, documents)), time.perf_counter() - began)
            yield from documents

    @torch.inference_mode()
    def _sample(self, tokenizer: PreTrainedTokenizerBase, prompts: tuple[str, ...], seed: int) -> Iterator[list[int]]:
        """Each opening and its sampled continuation (up to its end-of-sequence token), in one batch.

        A plain KV-cached loop rather than `generate`: at batch 100 on a CPU generate's per-step
        bookkeeping and its sampler (a full sort and a multinomial over the vocabulary) cost as much
        as the forward pass itself."""
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.model.device)
        finally:
            tokenizer.padding_side = side
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = {cache_keyword(self.model): DynamicCache(config=self.model.config)}  # filled in place
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                         **cache)
        stops = torch.tensor(sorted(_stop_ids(self.model, tokenizer)), dtype=torch.long, device=mask.device)
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        sampled: list[torch.Tensor] = []
        for _ in range(self.tokens_per_document):
            token = nucleus_sample(out.logits[:, -1].float().softmax(-1), self.top_p, generator)
            token = token.masked_fill(done[:, None], -1)  # finished rows: nothing more (-1 is dropped below)
            sampled.append(token)
            done |= torch.isin(token[:, 0], stops)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)  # a finished row's outputs are unused
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=token.clamp_min(0), attention_mask=mask, position_ids=positions,
                             use_cache=True, **cache)
        new = torch.cat(sampled, -1).tolist()
        for prompt_ids, prompt_mask, continuation in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), new):
            opening = [t for t, keep in zip(prompt_ids, prompt_mask) if keep]
            yield opening + [t for t in continuation if t >= 0 and t != tokenizer.pad_token_id]


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The end-of-sequence ids of the model's generation config and of the tokenizer."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


def nucleus_sample(probs: torch.Tensor, top_p: float, generator: torch.Generator, candidates: int = 1024) -> torch.Tensor:
    """One token per row of `probs` (b, V) from its top-p nucleus: the most probable tokens whose mass
    reaches `top_p` (all tokens tied at the boundary included), renormalised.

    A full sort and a multinomial over the whole vocabulary cost about as much as the model's forward
    pass on a CPU at batch 100 (SmolLM2's 49k tokens); the nucleus is found among the top
    `candidates` instead, with a full sort only for the rare rows whose nucleus is larger, and the
    token drawn by inverse CDF (one uniform per row)."""
    k = min(candidates, probs.shape[-1])
    values, _ = probs.topk(k, dim=-1)
    mass = values.cumsum(-1)
    edge = (mass < top_p).sum(-1).clamp_max(k - 1)  # the first candidate at which the mass reaches top_p
    threshold = values.gather(-1, edge[:, None])
    wide = (mass[:, -1] < top_p).nonzero().flatten()  # rows whose nucleus is wider than the candidates
    if len(wide):
        ordered = probs[wide].sort(dim=-1, descending=True).values
        edge_wide = (ordered.cumsum(-1) < top_p).sum(-1).clamp_max(ordered.shape[-1] - 1)
        threshold[wide] = ordered.gather(-1, edge_wide[:, None])
    kept = torch.where(probs >= threshold, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    cdf = kept.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1)


def packed_batches(
    documents: Iterator[list[int]], seq_len: int, batch_size: int, budget: int, separator: int | None
) -> Iterator[torch.Tensor]:
    """Concatenate documents and cut them into (b, seq_len) batches: exactly `budget` tokens
    (fewer if the documents run out), the remainder as one last shorter row.

    Packing means no padding: every token counted is a real token.
    """
    buffer: list[int] = []
    rows: list[list[int]] = []
    remaining = budget
    for doc in documents:
        buffer.extend(doc + ([separator] if separator is not None else []))
        while len(buffer) >= seq_len and remaining >= seq_len:
            rows.append(buffer[:seq_len])
            buffer, remaining = buffer[seq_len:], remaining - seq_len
            if len(rows) == batch_size:
                yield torch.tensor(rows, dtype=torch.long)
                rows = []
        if remaining < seq_len and len(buffer) >= remaining:
            break
    if rows:
        yield torch.tensor(rows, dtype=torch.long)
    tail = buffer[: min(remaining, seq_len)]
    if tail:
        yield torch.tensor([tail], dtype=torch.long)
