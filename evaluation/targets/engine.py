"""The in-process target: an Editor on a loaded model, scored with the engine's batched scorer."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from evaluation.data import HeldOutText
from evaluation.targets import BatchOutcome, Query, QueryScore
from service.bootstrap import build_editor, corpus_from, hparams_from, load_from
from service.config import Settings
from service.engine.corpus import Corpus
from service.engine.editor import Editor
from service.engine.prompts import Row
from service.engine.scoring import Score, continuation_row, score_rows
from service.engine.types import EditRequest
from service.errors import EditFailed, InvalidRequest
from service.model.loading import LoadedModel

log = logging.getLogger(__name__)


def check_heldout_disjoint(loaded: LoadedModel, corpus: Corpus, heldout: HeldOutText, stats_tokens: int) -> None:
    """Perplexity text must not be statistics text: the statistics read a file from its start,
    the held-out slice is its end; refuse a budget that would reach into it."""
    files = [f.resolve() for f in getattr(corpus, "files", [])]
    if heldout.path.resolve() not in files:
        return
    text = heldout.path.read_text(encoding="utf-8", errors="replace")[: heldout.start_char]
    before = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    if before < stats_tokens:
        raise InvalidRequest(
            f"the perplexity slice of {heldout.path.name} starts after {before} tokens, but the key statistics "
            f"read {stats_tokens} tokens of the same file; lower --stats-tokens or --ppl-chunks"
        )


def open_editor(settings: Settings, heldout: HeldOutText | None, progress: bool) -> tuple[Editor, dict[str, float]]:
    """The editor the service would build from `settings` (service.bootstrap), with the time spent
    loading the model and on the key statistics; the held-out text is checked before the statistics."""
    hparams = hparams_from(settings)
    torch.manual_seed(hparams.context_seed)
    start = time.perf_counter()
    loaded = load_from(settings)
    loaded_at = time.perf_counter()
    if heldout is not None:
        check_heldout_disjoint(loaded, corpus_from(settings.corpus, loaded), heldout, hparams.stats_tokens)
    editor = build_editor(settings, progress=progress, loaded=loaded)
    timings = {"load_s": loaded_at - start, "statistics_s": time.perf_counter() - loaded_at}
    return editor, timings


def _chunks(rows: Sequence[Row], max_tokens: int, max_targets: int) -> Iterator[list[Row]]:
    """Consecutive rows with at most `max_tokens` padded tokens (the forward pass) and
    `max_targets` target tokens (each costs a vocabulary-sized row of log-probabilities)."""
    chunk: list[Row] = []
    width = targets = 0
    for row in rows:
        new_width, new_targets = max(width, len(row.ids)), targets + len(row.targets)
        if chunk and (new_width * (len(chunk) + 1) > max_tokens or new_targets > max_targets):
            yield chunk
            chunk, new_width, new_targets = [], len(row.ids), len(row.targets)
        chunk.append(row)
        width, targets = new_width, new_targets
    if chunk:
        yield chunk


class EngineTarget:
    """Edits and measures one in-process model. Scoring reads under the editor's read lock."""

    kind = "local"

    # Bounds keep every activation and logit buffer under glibc's 32 MB mmap threshold: larger ones are
    # mapped and zeroed afresh at every call (measured: 60 CounterFact cases 33 s -> 24 s on one core).
    def __init__(self, editor: Editor, max_batch_tokens: int = 2048, max_target_tokens: int = 128,
                 generate_batch_size: int = 64) -> None:
        self.editor = editor
        self.tokenizer = editor.tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.max_target_tokens = max_target_tokens
        self.generate_batch_size = generate_batch_size
        self.version = editor.version

    def apply(self, requests: Sequence[EditRequest], batch_id: str) -> BatchOutcome:
        edit_ids = [f"{batch_id}-{j}" for j in range(len(requests))]
        try:
            update = self.editor.compute(requests, edit_ids, batch_id)
            start = time.perf_counter()
            self.editor.install(self.editor.plan_commit(update), self.version + 1)
        except EditFailed as exc:
            log.warning("batch %s failed, its %d edits are not applied: %s", batch_id, len(requests), exc.message)
            return BatchOutcome(len(requests), applied=False, error=exc.message, model_version=self.version)
        self.version += 1
        timings = {**update.timings, "commit_s": time.perf_counter() - start}
        return BatchOutcome(len(requests), True, None, self.version, timings, list(update.steps),
                            [float(x) for x in update.target_nll])

    def _score_rows(self, rows: Sequence[Row]) -> list[Score]:
        scores = []
        with self.editor.reading():
            for chunk in _chunks(rows, self.max_batch_tokens, self.max_target_tokens):
                scores.extend(score_rows(self.editor.adapter, None, chunk, self.tokenizer.pad_token_id,
                                         batch_size=len(chunk)))
        return scores

    def score(self, queries: Sequence[Query]) -> list[QueryScore]:
        rows = [continuation_row(self.tokenizer, q.prompt, q.continuation) for q in queries]
        return [QueryScore(s.total_logprob, s.tokens, s.top1_correct) for s in self._score_rows(rows)]

    def token_accuracy(self, queries: Sequence[Query]) -> list[float | None]:
        """Share of continuation tokens that are the argmax given the prompt and the true tokens before
        them. The paper's code runs one prompt per token for this; under a causal mask one
        teacher-forced row gives the same argmaxes at a fraction of the cost."""
        rows = [continuation_row(self.tokenizer, q.prompt, q.continuation) for q in queries]
        return [s.tokens_correct / s.tokens for s in self._score_rows(rows)]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        texts: list[str] = []
        with self.editor.reading():
            for start in range(0, len(prompts), self.generate_batch_size):
                texts.extend(self._generate_batch(prompts[start : start + self.generate_batch_size], max_new_tokens))
        return texts

    def _generate_batch(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        model, tokenizer = self.editor.model, self.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        batch = batch.to(model.get_input_embeddings().weight.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        loaded = self.editor.loaded
        return {
            "backend": self.kind,
            "model": loaded.name,
            "model_fingerprint": loaded.fingerprint,
            "device": str(self.editor.adapter.head.weight.device),
            "dtype": str(self.editor.adapter.head.weight.dtype).removeprefix("torch."),
            **self.editor.info(),
        }

    def close(self) -> None:
        self.editor.close()
