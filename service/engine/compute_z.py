"""Target values z for a batch of requests (alphaedit.md §2), optimised together.

The residual stream after the last edited layer is computed once (nothing before it depends
on delta); each step runs only the blocks after it, and the head only at the positions the
loss reads. Requests that have converged leave the batch.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from service.engine.prefix_cache import SuffixBatch, split_at_lookup
from service.engine.prompts import KL_TEMPLATE, Row, contextual, encode_with_subject, pad_rows, teacher_forced_row
from service.engine.types import EditRequest, HyperParams
from service.model.adapters import ModelAdapter, cache_keyword

log = logging.getLogger(__name__)


@dataclass
class Targets:
    z: torch.Tensor  # (n, H) float32: h0 + delta
    h0: torch.Tensor  # (n, H) float32
    steps: list[int]  # optimisation steps taken per request
    nll: list[float]  # final mean per-token NLL of target_new on the rewriting prompts
    greedy: list[bool]  # every target token the argmax (by the margin) on every rewriting prompt at the end


def build_rows(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], templates: Sequence[str]
) -> tuple[list[Row], list[Row]]:
    """Rewriting rows (one per context template and request) and one KL row per request."""
    rewriting = [
        teacher_forced_row(tokenizer, j, contextual(req.template, ctx), req.subject, req.target_new)
        for j, req in enumerate(requests)
        for ctx in templates
    ]
    kl = []
    for j, req in enumerate(requests):
        ids, lookup = encode_with_subject(tokenizer, KL_TEMPLATE, req.subject)
        kl.append(Row(j, tuple(ids), lookup))
    return rewriting, kl


@dataclass
class _Gather:
    """Index tensors for the rows of the still-active requests."""

    rows: torch.Tensor  # (B_active,) rows of the full batch
    owner: torch.Tensor  # (B_active,) request of each row
    tok_row: torch.Tensor  # (N_tok,) local row of each target token
    tok_pos: torch.Tensor  # (N_tok,)
    tok_id: torch.Tensor  # (N_tok,)
    tok_weight: torch.Tensor  # (N_tok,) 1 / (tokens in row · rewriting rows of the request)
    kl_local: torch.Tensor  # (n_active,) local row of each active request's KL row
    kl_owner: torch.Tensor  # (n_active,)


def _gather(rows: list[Row], is_kl: list[bool], active: list[int], device: torch.device) -> _Gather:
    active_set = set(active)
    chosen = [i for i, row in enumerate(rows) if row.request in active_set]
    per_request = {j: sum(1 for i in chosen if rows[i].request == j and not is_kl[i]) for j in active}
    tok_row, tok_pos, tok_id, tok_w, kl_local, kl_owner = [], [], [], [], [], []
    for local, i in enumerate(chosen):
        row = rows[i]
        if is_kl[i]:
            kl_local.append(local)
            kl_owner.append(row.request)
            continue
        weight = 1.0 / (len(row.targets) * per_request[row.request])
        for pos, tid in zip(row.target_positions, row.targets):  # suffix index = position - lookup
            tok_row.append(local)
            tok_pos.append(pos - row.lookup)
            tok_id.append(tid)
            tok_w.append(weight)

    def t(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return _Gather(
        rows=t(chosen), owner=t([rows[i].request for i in chosen]),
        tok_row=t(tok_row), tok_pos=t(tok_pos), tok_id=t(tok_id), tok_weight=t(tok_w, torch.float32),
        kl_local=t(kl_local), kl_owner=t(kl_owner),
    )


def compute_targets(
    adapter: ModelAdapter,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    hparams: HyperParams,
    layer: int,
) -> Targets:
    """Optimise one delta per request at the output of block `layer` (the last edited layer)."""
    device = adapter.head.weight.device
    rewriting, kl_rows = build_rows(tokenizer, requests, templates)
    rows = rewriting + kl_rows
    is_kl = [False] * len(rewriting) + [True] * len(kl_rows)
    ids, mask = pad_rows(rows, tokenizer.pad_token_id, device)
    with torch.no_grad():
        hidden = adapter.slice(0, layer + 1)(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    n = len(requests)
    first_row = [next(i for i, r in enumerate(rows) if r.request == j) for j in range(n)]
    h0 = hidden[first_row, [rows[i].lookup for i in first_row]].float()  # (n, H)
    tail = adapter.slice(layer + 1, adapter.num_layers)
    lookups = torch.tensor([r.lookup for r in rows], device=device)
    suffix = split_at_lookup(tail, hidden, mask.sum(dim=1), lookups)
    return _optimise(adapter, tail, hparams, rows, is_kl, suffix, h0)


def _optimise(
    adapter: ModelAdapter, tail: torch.nn.Module, hparams: HyperParams, rows: list[Row], is_kl: list[bool],
    suffix: SuffixBatch, h0: torch.Tensor,
) -> Targets:
    n = h0.shape[0]
    delta = torch.zeros_like(h0, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    max_norm = hparams.clamp_norm_factor * h0.norm(dim=1)  # (n,)
    kl_init = torch.zeros(n, adapter.head.weight.shape[0], device=h0.device)
    final = torch.zeros_like(h0)
    steps, nll_final, greedy_final = [0] * n, [float("nan")] * n, [False] * n
    active, selected_for = list(range(n)), list[int]()
    for step in range(hparams.v_num_grad_steps):
        if active != selected_for:  # the batch shrinks as requests converge
            g = _gather(rows, is_kl, active, h0.device)
            batch, selected_for = suffix.select(g.rows), list(active)
        out = _run_suffix(tail, batch, delta[g.owner])
        nll, kl, greedy = _losses(adapter, out, g, n, kl_init, first_step=step == 0,
                                  margin=hparams.v_stop_greedy_margin)
        decay = hparams.v_weight_decay * delta.norm(dim=1) / h0.norm(dim=1) ** 2
        loss = nll + hparams.kl_factor * kl + decay  # (n,): rows of inactive requests are 0
        done = _converged(hparams, loss, nll, greedy, active, last=step == hparams.v_num_grad_steps - 1)
        for j in active:
            steps[j], nll_final[j], greedy_final[j] = step + 1, float(nll[j].detach()), bool(greedy[j])
        for j in done:
            final[j] = delta[j].detach()
        active = [j for j in active if j not in done]
        if not active:
            break
        optimizer.zero_grad()
        loss[active].sum().backward()  # deltas are independent: each gets its own loss's gradient
        optimizer.step()
        with torch.no_grad():
            _freeze_and_clamp(delta, final, active, max_norm)
    log.debug("targets: steps=%s nll=%s", steps, nll_final)
    return Targets(z=h0 + final, h0=h0, steps=steps, nll=nll_final, greedy=greedy_final)


def _run_suffix(tail: torch.nn.Module, batch: SuffixBatch, delta_rows: torch.Tensor) -> torch.Tensor:
    """The blocks after the edited layer on the suffixes, delta added at each lookup (index 0)."""
    first = batch.hidden[:, :1] + delta_rows[:, None].to(batch.hidden.dtype)
    x = torch.cat([first, batch.hidden[:, 1:]], dim=1)  # (B, S, H)
    out = tail(inputs_embeds=x, attention_mask=batch.mask, position_ids=batch.positions,
               use_cache=batch.cache is not None, **{cache_keyword(tail): batch.cache})
    return out.last_hidden_state


def _losses(
    adapter: ModelAdapter, out: torch.Tensor, g: _Gather, n: int, kl_init: torch.Tensor, first_step: bool,
    margin: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-request mean target NLL, KL(current ‖ initial) at the KL prompt's lookup, and whether every
    target token is the argmax with `margin` (0 when None) to spare, each (n,)."""
    logp = torch.log_softmax(adapter.logits_at(out[g.tok_row, g.tok_pos]).float(), dim=-1)
    target_logp = logp.gather(1, g.tok_id[:, None])[:, 0]
    token_nll = -target_logp * g.tok_weight
    owner_of_token = g.owner[g.tok_row]
    nll = torch.zeros(n, device=out.device).index_add(0, owner_of_token, token_nll)
    greedy = torch.zeros(n, dtype=torch.bool, device=out.device)
    with torch.no_grad():  # measured without a margin too, to report it
        top2 = logp.detach().topk(2, dim=1)  # no copy of the vocabulary-wide rows, unlike masking the target
        runner_up = torch.where(top2.indices[:, 0] == g.tok_id, top2.values[:, 1], top2.values[:, 0])
        misses = (target_logp.detach() - runner_up < (margin or 0.0)).float()
        missed = torch.zeros(n, device=out.device).index_add(0, owner_of_token, misses)
        greedy[g.owner.unique()] = missed[g.owner.unique()] == 0
    kl_logp = torch.log_softmax(adapter.logits_at(out[g.kl_local, 0]).float(), dim=-1)
    if first_step:
        kl_init[g.kl_owner] = kl_logp.detach()
    kl_each = F.kl_div(kl_init[g.kl_owner], kl_logp, log_target=True, reduction="none").sum(-1)
    kl = torch.zeros(n, device=out.device).index_add(0, g.kl_owner, kl_each)
    return nll, kl, greedy


def _converged(hparams: HyperParams, loss: torch.Tensor, nll: torch.Tensor, greedy: torch.Tensor,
               active: list[int], last: bool) -> set[int]:
    if last:
        return set(active)
    mpes = hparams.v_stop_greedy_margin is not None
    done = {j for j in active if float(loss[j].detach()) < hparams.v_stop_loss or (mpes and bool(greedy[j]))}
    if hparams.v_stop_nll is not None:
        done |= {j for j in active if float(nll[j].detach()) < hparams.v_stop_nll}
    return done


def _freeze_and_clamp(delta: torch.Tensor, final: torch.Tensor, active: list[int], max_norm: torch.Tensor) -> None:
    """Finished requests keep their delta (Adam's momentum would move them); others are clamped."""
    inactive = torch.ones(delta.shape[0], dtype=torch.bool, device=delta.device)
    inactive[active] = False
    delta[inactive] = final[inactive]
    norms = delta.norm(dim=1)
    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
    delta.mul_(scale[:, None])
