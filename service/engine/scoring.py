"""Log-probabilities of continuations: edit metrics, /score and the evaluation's NLL comparisons."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from service.engine.prompts import Row, encode, pad_rows, target_ids
from service.engine.trace import LayerTrace, Pending
from service.model.adapters import ModelAdapter


@dataclass(frozen=True)
class Score:
    total_logprob: float
    tokens: int
    tokens_correct: int  # how many target tokens are the argmax under teacher forcing

    @property
    def mean_logprob(self) -> float:
        return self.total_logprob / self.tokens

    @property
    def top1_correct(self) -> bool:
        """Every target token is the argmax under teacher forcing."""
        return self.tokens_correct == self.tokens


def continuation_row(tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str) -> Row:
    ids = encode(tokenizer, prompt)
    targets = target_ids(tokenizer, prompt, continuation)
    return Row(0, tuple(ids + targets[:-1]), len(ids) - 1, tuple(targets))


@torch.no_grad()
def score_rows(
    adapter: ModelAdapter,
    trace: LayerTrace | None,
    rows: Sequence[Row],
    pad_id: int,
    pending: Pending | None = None,
    batch_size: int = 64,
) -> list[Score]:
    """Teacher-forced log-probability of each row's targets, on the model plus `pending` updates."""
    scores: list[Score] = []
    for start in range(0, len(rows), batch_size):
        scores.extend(_score_batch(adapter, trace, rows[start : start + batch_size], pad_id, pending))
    return scores


def _score_batch(adapter: ModelAdapter, trace: LayerTrace | None, rows: Sequence[Row], pad_id: int,
                 pending: Pending | None) -> list[Score]:
    device = adapter.head.weight.device
    ids, mask = pad_rows(rows, pad_id, device)
    stack = adapter.slice(0, adapter.num_layers)
    if trace is not None and pending:
        with trace.tracing(pending=pending):
            hidden = stack(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        hidden = stack(input_ids=ids, attention_mask=mask).last_hidden_state
    row_index = [i for i, row in enumerate(rows) for _ in row.targets]
    positions = [p for row in rows for p in row.target_positions]
    targets = torch.tensor([t for row in rows for t in row.targets], device=device)
    logp = torch.log_softmax(adapter.logits_at(hidden[row_index, positions]).float(), dim=-1)
    chosen = logp.gather(1, targets[:, None])[:, 0]
    correct = logp.argmax(dim=-1) == targets
    scores, offset = [], 0
    for row in rows:
        span = slice(offset, offset + len(row.targets))
        scores.append(Score(float(chosen[span].sum()), len(row.targets), int(correct[span].sum())))
        offset += len(row.targets)
    return scores
