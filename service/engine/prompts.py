"""Tokenisation of edit prompts: subject lookup positions, teacher-forced targets, batches.

Every index is computed on the same tokenisation (special tokens included) as the forward
pass, and batches are right-padded, so a position is the same in a row and in the batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

CONTEXT_PREFIXES = ("The", "Therefore", "Because", "I", "You")
KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class Row:
    request: int  # index of the request in its batch
    ids: tuple[int, ...]
    lookup: int  # position of the subject's last token
    targets: tuple[int, ...] = ()  # teacher-forced target ids; empty for key and KL rows

    @property
    def target_positions(self) -> range:
        """Positions whose next-token logits predict `targets`."""
        start = len(self.ids) - len(self.targets)
        return range(start, start + len(self.targets))


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_with_subject(tokenizer: PreTrainedTokenizerBase, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of `template` with the subject filled in, and the subject's last-token index."""
    before = template.split("{}", 1)[0]
    ids = encode(tokenizer, template.replace("{}", subject, 1))
    lookup = len(encode(tokenizer, before + subject)) - 1
    return ids, min(lookup, len(ids) - 1)


def target_ids(tokenizer: PreTrainedTokenizerBase, prompt_text: str, target: str) -> list[int]:
    """The target's tokens as they follow the prompt (a leading space unless the prompt ends in one)."""
    text = target.strip()
    if prompt_text and not prompt_text[-1].isspace():
        text = " " + text
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def teacher_forced_row(
    tokenizer: PreTrainedTokenizerBase, request: int, template: str, subject: str, target: str
) -> Row:
    """Prompt followed by all target tokens but the last; the logits then predict every target token."""
    ids, lookup = encode_with_subject(tokenizer, template, subject)
    targets = target_ids(tokenizer, template.replace("{}", subject, 1), target)
    return Row(request, tuple(ids + targets[:-1]), lookup, tuple(targets))


def contextual(template: str, context: str) -> str:
    """Put a request template ("... {} ...") inside a context template ("... {}")."""
    return context.replace("{}", template, 1)


def pad_rows(rows: Sequence[Row], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and attention mask (B, T)."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        mask[i, : len(row.ids)] = 1
    return ids.to(device), mask.to(device)
