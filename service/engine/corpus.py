"""Sources of preserved-knowledge text, as token-id documents, and their packing into batches."""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
                 tokens_per_document: int = 128, batch_size: int = 50) -> None:
        self.model = model
        self.seed = seed
        self.tokens_per_document = tokens_per_document
        self.batch_size = batch_size
        settings = f"{model_fingerprint}:{seed}:{tokens_per_document}:{batch_size}:{'|'.join(SELF_PROMPTS)}"
        self.fingerprint = "self-" + hashlib.sha256(settings.encode()).hexdigest()[:16]

    def documents(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
        round_, batches = 0, 0
        while True:  # the caller's token budget ends it
            for start in range(0, len(SELF_PROMPTS), self.batch_size):
                prompts = SELF_PROMPTS[start : start + self.batch_size]
                began = time.perf_counter()
                documents = list(self._sample(tokenizer, prompts, self.seed * 1_000_003 + round_ * 1009 + start))
                batches += 1
                log.info("self corpus: batch %d generated, %d documents, %d tokens in %.1f s", batches,
                         len(documents), sum(map(len, documents)), time.perf_counter() - began)
                yield from documents
            round_ += 1

    @torch.no_grad()
    def _sample(self, tokenizer: PreTrainedTokenizerBase, prompts: tuple[str, ...], seed: int) -> Iterator[list[int]]:
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.model.device)
        finally:
            tokenizer.padding_side = side
        with torch.random.fork_rng(devices=[] if self.model.device.type == "cpu" else [self.model.device]):
            torch.manual_seed(seed)
            out = self.model.generate(
                **batch, do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=self.tokens_per_document,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row, row_mask in zip(out, batch["attention_mask"]):
            ids = row[int(row_mask.shape[0] - row_mask.sum()) :].tolist()
            yield [t for t in ids if t != tokenizer.pad_token_id]


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
