"""Keys of a batch: the edited module's input at the subject's last token (alphaedit.md §3)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from service.engine.prompts import Row, contextual, encode_with_subject, pad_rows
from service.engine.trace import LayerTrace, Pending
from service.engine.types import EditRequest
from service.model.adapters import ModelAdapter


def key_rows(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], templates: Sequence[str]) -> list[Row]:
    """One row per (request, context template); template 0 is "{}", the plain prompt. Each row ends at
    the subject's last token: under the causal mask nothing after it changes the key or the output there."""
    rows = []
    for j, req in enumerate(requests):
        for ctx in templates:
            ids, lookup = encode_with_subject(tokenizer, contextual(req.template, ctx), req.subject)
            rows.append(Row(j, tuple(ids[: lookup + 1]), lookup))
    return rows


def _average_over_templates(vectors: torch.Tensor, n: int, per_request: int) -> torch.Tensor:
    """½ · plain prompt + ½ · mean of the generated templates, as the reference weights them. (n, d)"""
    grouped = vectors.reshape(n, per_request, -1)
    if per_request == 1:
        return grouped[:, 0]
    return 0.5 * grouped[:, 0] + 0.5 * grouped[:, 1:].mean(dim=1)


@torch.no_grad()
def keys_and_outputs(
    adapter: ModelAdapter,
    trace: LayerTrace,
    rows: Sequence[Row],
    n: int,
    layers: Iterable[int],
    last_layer: int,
    pending: Pending | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Keys K_l (d_in, n) float32 for `layers`, and H (n, H): block `last_layer`'s output at the
    plain prompt's subject token, on the model plus `pending` updates."""
    device = adapter.head.weight.device
    ids, mask = pad_rows(rows, 0, device)
    layers = list(layers)
    with trace.tracing(capture=layers, pending=pending) as captured:
        hidden = adapter.slice(0, last_layer + 1)(input_ids=ids, attention_mask=mask).last_hidden_state
    index = (torch.arange(len(rows), device=device), torch.tensor([r.lookup for r in rows], device=device))
    per_request = len(rows) // n
    keys = {
        layer: _average_over_templates(captured[layer][index].float(), n, per_request).T.contiguous()
        for layer in layers
    }
    outputs = hidden[index].float().reshape(n, per_request, -1)[:, 0]
    return keys, outputs
