"""The editor: one object per worker that owns a model's editing state.

It computes a batch's rank-one factors without touching the served weights, then commits
them by recomposing the edited weights from W0 and swapping them in under the write lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from service.concurrency import ReadWriteLock
from service.engine import solve
from service.engine.compute_z import compute_targets
from service.engine.corpus import Corpus
from service.engine.factors import Change, EditFactors, FactorStore, LayerFactor, on_grid
from service.engine.keys import key_rows, keys_and_outputs
from service.engine.projector import NullSpace, null_space
from service.engine.scoring import Score, continuation_row, score_rows
from service.engine.nullspace_cache import cached_null_spaces
from service.engine.stats import cache_path, cached_second_moments, save_atomic
from service.engine.templates import cached_context_templates, context_templates
from service.engine.trace import LayerTrace, Pending
from service.engine.types import EditRequest, HyperParams, Method, RequestMetrics
from service.errors import Conflict, EditFailed
from service.model.adapters import ModelAdapter, default_layers
from service.model.loading import LoadedModel
from service.progress import Progress
from service.swap_gate import SwapGate

log = logging.getLogger(__name__)


@dataclass
class BatchUpdate:
    """A computed, not yet committed batch: per-request factors plus what the ledger records."""

    edits: list[EditFactors]
    update_norms: list[dict[int, float]]  # per request: ||r a ᵀ|| per layer
    pending: Pending  # per layer (A, R), for measuring before commit
    steps: list[int]
    target_nll: list[float]
    target_greedy: list[bool]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class WeightSwap:
    """Edited weights planned from the factor store, with their digest, not yet installed."""

    weights: dict[int, torch.Tensor]  # per layer, in the parameter's layout, dtype and device
    digest: str
    change: Change


class Editor:
    def __init__(
        self,
        loaded: LoadedModel,
        hparams: HyperParams,
        second_moments: dict[int, torch.Tensor],
        method: Method = "alphaedit",
        templates: list[str] | None = None,
        keep_factors: bool = True,
        null_spaces: dict[int, NullSpace] | None = None,
    ) -> None:
        """`null_spaces`: already computed from these second moments and hparams' rule (the cached ones
        of `create`); by default computed here."""
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.adapter = ModelAdapter(loaded.model)
        layers = list(hparams.layers) or default_layers(self.adapter.num_layers)
        self.hparams = hparams.with_overrides(layers=layers)
        self.layers = layers
        self.method = method
        device = self.adapter.head.weight.device  # the solves run where the model is, in float64
        self.second_moments = {layer: second_moments[layer].to(device) for layer in layers}
        self.null_spaces: dict[int, NullSpace] = null_spaces or {
            layer: null_space(self.second_moments[layer], hparams.nullspace_threshold, hparams.nullspace_energy)
            for layer in layers
        }
        self._check_null_spaces()
        self.trace = LayerTrace(self.adapter, layers)
        self.store = self._empty_store({layer: self.adapter.weight(layer) for layer in layers}, keep_factors)
        self.templates = templates or context_templates(
            self.model, self.tokenizer, hparams.context_seed, hparams.context_template_len
        )
        self.lock = ReadWriteLock()
        self.swap_gate = SwapGate()  # announces waiting swaps to the decoder, records their waits
        self.version = 0
        self._served_digest: str | None = None  # of the installed weights; None until first asked

    @classmethod
    def create(
        cls, loaded: LoadedModel, hparams: HyperParams, corpus: Corpus, cache_dir: Path,
        method: Method = "alphaedit", progress: bool = True, keep_factors: bool = True,
        tracker: Progress | None = None,
    ) -> "Editor":
        """Collect (or load cached) key statistics over `corpus` and their null spaces, then build the
        editor. `tracker` hears of each phase (statistics tokens, null-space layers)."""
        tracker = tracker or Progress()
        adapter = ModelAdapter(loaded.model)
        layers = list(hparams.layers) or default_layers(adapter.num_layers)
        trace = LayerTrace(adapter, layers)
        tracker.phase("key statistics", hparams.stats_tokens, "tokens")
        try:
            moments = cached_second_moments(
                adapter, trace, loaded.tokenizer, corpus, layers, model_fingerprint=loaded.fingerprint,
                cache_dir=cache_dir, budget=hparams.stats_tokens, seq_len=hparams.stats_seq_len,
                batch_size=hparams.stats_batch_size, progress=progress, on_tokens=tracker.advance,
            )
        finally:
            trace.close()
        null_spaces = None
        if method == "alphaedit":
            tracker.phase("null space", len(layers), "layers")
            stats_paths = {layer: cache_path(cache_dir, loaded.fingerprint, layer, corpus.fingerprint,
                                             hparams.stats_tokens, hparams.stats_seq_len) for layer in layers}
            null_spaces = cached_null_spaces(moments, stats_paths, hparams.nullspace_threshold,
                                             hparams.nullspace_energy, adapter.head.weight.device, tracker.advance)
        tracker.phase("context templates")
        templates = cached_context_templates(loaded.model, loaded.tokenizer, loaded.fingerprint, cache_dir,
                                             hparams.context_seed, hparams.context_template_len)
        return cls(loaded, hparams.with_overrides(layers=layers), moments, method, templates=templates,
                   keep_factors=keep_factors, null_spaces=null_spaces)

    def _check_null_spaces(self) -> None:
        if self.method != "alphaedit":
            return
        for layer, ns in self.null_spaces.items():
            log.info("layer %d: null space keeps %d of %d dimensions (%.1f%%)",
                     layer, ns.kept, ns.eigenvalues.shape[0], 100 * ns.kept_fraction)
            if ns.kept == 0:
                raise EditFailed(
                    f"layer {layer}: the null space is empty at threshold {self.hparams.nullspace_threshold}; "
                    "raise nullspace_threshold or use nullspace_energy"
                )

    # ---- computing -------------------------------------------------------------------------

    def compute(self, requests: Sequence[EditRequest], edit_ids: Sequence[str], batch_id: str) -> BatchUpdate:
        """Factors for a batch, on the current weights; the served model is not touched."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        targets = compute_targets(self.adapter, self.tokenizer, requests, self.templates, self.hparams, self.layers[-1])
        timings["targets_s"] = time.perf_counter() - start
        start = time.perf_counter()
        pending, keys = self._layer_updates(requests, targets.z)
        timings["keys_solve_s"] = time.perf_counter() - start
        edits = [
            EditFactors(edit_id, batch_id, {
                layer: LayerFactor(*on_grid(pending[layer][1][:, j].cpu(), pending[layer][0][:, j].cpu()),
                                   k=keys[layer][:, j].cpu().clone())
                for layer in self.layers
            })
            for j, edit_id in enumerate(edit_ids)
        ]
        norms = [{layer: float(f.r.norm() * f.a.norm()) for layer, f in e.layers.items()} for e in edits]
        return BatchUpdate(edits, norms, pending, targets.steps, targets.nll, targets.greedy, timings)

    def _layer_updates(self, requests: Sequence[EditRequest], z: torch.Tensor) -> tuple[Pending, dict[int, torch.Tensor]]:
        rows = key_rows(self.tokenizer, requests, self.templates)
        n, last = len(requests), self.layers[-1]
        pending: Pending = {}
        for i, layer in enumerate(self.layers):
            keys, outputs = keys_and_outputs(self.adapter, self.trace, rows, n, [layer], last, pending)
            resid = solve.residuals(z, outputs, len(self.layers) - i)  # (d_out, n)
            directions = self._directions(layer, keys[layer], resid)  # (d_in, n)
            self._check_update(layer, directions, resid)
            pending[layer] = (directions.float(), resid.float())
        final_keys, _ = keys_and_outputs(self.adapter, self.trace, rows, n, self.layers, last, pending)
        return pending, final_keys

    def _directions(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        prior, penalty = self.store.prior(layer), self.hparams.norm_penalty
        pull = solve.norm_pull(self.store.accumulated(layer), resid, penalty) if penalty > 0 else None
        if self.method == "alphaedit":
            return solve.alphaedit_directions(keys, self.null_spaces[layer].basis, prior, self.hparams.L2,
                                              penalty, pull)
        return solve.memit_directions(keys, self.second_moments[layer], prior, self.hparams.mom2_update_weight,
                                      penalty, pull)

    def _check_update(self, layer: int, directions: torch.Tensor, resid: torch.Tensor) -> None:
        # ||R Aᵀ||_F² = trace((AᵀA)(RᵀR)): no need to build the dense update
        norm = float(torch.sqrt(((directions.T @ directions) * (resid.T @ resid)).sum().clamp_min(0)))
        base = float(self.store.base_weight(layer).norm())
        if not (torch.isfinite(directions).all() and torch.isfinite(resid).all()):
            raise EditFailed(f"layer {layer}: the update is not finite; the model is unchanged")
        if norm > self.hparams.max_update_ratio * base:
            raise EditFailed(
                f"layer {layer}: update norm {norm:.3g} exceeds {self.hparams.max_update_ratio} x "
                f"the weight norm {base:.3g}; the model is unchanged"
            )

    # ---- committing --------------------------------------------------------------------------

    def plan_commit(self, update: BatchUpdate) -> WeightSwap:
        """The weights with a computed batch added, ready to install (nothing changes yet)."""
        duplicate = [e.edit_id for e in update.edits if e.edit_id in self.store]
        if duplicate:
            raise Conflict(f"edits already active in the model: {duplicate}")
        return self._plan(add=list(update.edits))

    def plan_revert(self, edit_id: str, factors: EditFactors | None = None) -> WeightSwap:
        """The weights without one active edit. `factors`: the edit's own, when the store does not
        keep them (the worker reads them from the ledger)."""
        if edit_id not in self.store:
            raise Conflict(f"edit {edit_id} is not active in the model")
        edit = factors or self.store.factors(edit_id)
        if edit is None:
            raise EditFailed(f"the factors of edit {edit_id} are needed to revert it; the model is unchanged")
        return self._plan(remove=[edit])

    def install(self, swap: WeightSwap, version: int) -> None:
        """Swap the planned weights in together, under the write lock, and update the store.

        The swap is announced on `swap_gate` first: the batched decoder then admits no new sequence,
        lets those of the old version finish (bounded by its KNOWPATCH_SWAP_WAIT_S) and releases its
        read lock, so no sequence is decoded on two versions. The wait is recorded on the gate."""
        with self.swap_gate.waiting() as wait, self.lock.write():
            wait.granted()
            for layer, weight in swap.weights.items():
                self.adapter.assign(layer, weight)
            self.version = version
            self._served_digest = swap.digest
            # Under the lock too: a reader (an export, /info) sees the store of the version it reads.
            self.store.apply(swap.change)

    def load(self, edits: Sequence[EditFactors], version: int) -> None:
        """Replay active edits (ledger order) onto a fresh editor: the store's sums in one pass."""
        self.install(self._plan(add=list(edits)), version)

    def _plan(self, add: Sequence[EditFactors] = (), remove: Sequence[EditFactors] = ()) -> WeightSwap:
        try:
            change = self.store.plan(add, remove)
        except OverflowError as exc:
            raise EditFailed(f"{exc}; the model is unchanged") from exc
        weights = {}
        for layer in self.layers:
            composed = self.store.weight_after(layer, change)
            if not torch.isfinite(composed).all():
                raise EditFailed(f"layer {layer}: recomposed weight is not finite; the model is unchanged")
            weights[layer] = self.adapter.stored_layout(layer, composed)
        return WeightSwap(weights, _digest(weights[layer] for layer in self.layers), change)

    def replay_ops(self, ops: Sequence[tuple[str, EditFactors]], version: int) -> None:
        """Operations after a snapshot, in ledger order ("apply" or "rollback", the edit's factors),
        then the weights installed at `version`."""
        for kind, edit in ops:
            if kind == "apply":
                self.store.add([edit])
            else:
                self.store.remove(edit.edit_id, edit)
        self.install(self._plan(), version)

    # ---- snapshots of the factor store ---------------------------------------------------------

    @cached_property
    def identity(self) -> str:
        """What a snapshot of the store is only valid for: model, method, layers, statistics (hashed
        once: the statistics never change for an editor)."""
        h = hashlib.sha256(json.dumps([self.loaded.fingerprint, self.method, self.layers]).encode())
        for layer in self.layers:
            h.update(self.second_moments[layer].contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def save_snapshot(self, path: Path, seq: int, chain_hash: str) -> None:
        """The store's sums at ledger `seq` (whose chain hash is `chain_hash`), written atomically."""
        save_atomic({"identity": self.identity, "seq": seq, "hash": chain_hash, **self.store.state()}, path)

    def restore_snapshot(self, path: Path, accept: Callable[[int, str], bool]) -> int | None:
        """Load a snapshot into this (empty) editor's store and return the seq it was taken at; None
        when there is none, it belongs to another model, method, layer set or statistics, or
        `accept(seq, chain_hash)` (the ledger's say) refuses it."""
        if not path.is_file():
            return None
        try:
            state = torch.load(path, weights_only=True)
        except Exception as exc:  # a torn or foreign file is only a missed shortcut
            log.warning("ignoring the factor-store snapshot %s: %s", path, exc)
            return None
        if state.get("identity") != self.identity:
            log.info("the factor-store snapshot %s was taken for other settings; replaying from the ledger", path)
            return None
        if not accept(int(state["seq"]), str(state["hash"])):
            log.warning("the factor-store snapshot %s is not a state of this ledger; replaying from the ledger", path)
            return None
        self.store.restore(state)
        return int(state["seq"])

    def clear(self) -> None:
        """Back to the unedited weights with an empty store (a replay that must start over)."""
        self.store = self._empty_store({layer: self.store.base_weight(layer) for layer in self.layers},
                                       self.store.keep_factors)
        self.install(self._plan(), 0)

    def _empty_store(self, base_weights: dict[int, torch.Tensor], keep_factors: bool) -> FactorStore:
        bases = {layer: ns.basis if self.method == "alphaedit" else None for layer, ns in self.null_spaces.items()}
        return FactorStore(base_weights, bases, keep_factors)

    # ---- reading -----------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the model still (no swap) and yield the version being served."""
        with self.lock.read():
            yield self.version

    def weights_digest(self) -> str:
        """sha256 over the edited weights as served (layout, dtype), in layer order, computed afresh."""
        return _digest(self.adapter.edited_module(layer).weight.detach() for layer in self.layers)

    def served_digest(self) -> str:
        """weights_digest of the installed weights, remembered from the swap (cheap: /info asks it)."""
        if self._served_digest is None:
            self._served_digest = self.weights_digest()
        return self._served_digest

    def measure(self, requests: Sequence[EditRequest], pending: Pending | None = None) -> list[RequestMetrics]:
        """Probabilities of target_new / target_true on each request's prompts."""
        plan: list[tuple[int, str, int, str]] = []  # (request, section, prompt index, which target)
        rows = []
        for j, req in enumerate(requests):
            sections = [("prompt", [req.template.replace("{}", req.subject, 1)]),
                        ("rephrase", [p.replace("{}", req.subject, 1) for p in req.rephrase_prompts]),
                        ("locality", list(req.locality_prompts))]
            targets = [("target_new", req.target_new)] + ([("target_true", req.target_true)] if req.target_true else [])
            for section, prompts in sections:
                for i, prompt in enumerate(prompts):
                    for name, target in targets:
                        plan.append((j, section, i, name))
                        rows.append(continuation_row(self.tokenizer, prompt, target))
        scores = score_rows(self.adapter, self.trace, rows, self.tokenizer.pad_token_id, pending)
        return _metrics_from(requests, plan, scores)

    def holds(self, pairs: Sequence[tuple[str, str]], pending: Pending | None = None) -> list[bool]:
        """Whether each (prompt, expected) continuation is the greedy one (every token the argmax), on the
        served weights or, with `pending`, on a computed batch not yet installed (quality-gate probes)."""
        rows = [continuation_row(self.tokenizer, prompt, expected) for prompt, expected in pairs]
        return [s.top1_correct for s in score_rows(self.adapter, self.trace, rows, self.tokenizer.pad_token_id, pending)]

    def score(self, prompt: str, candidates: Sequence[str]) -> list[Score]:
        rows = [continuation_row(self.tokenizer, prompt, c) for c in candidates]
        return score_rows(self.adapter, None, rows, self.tokenizer.pad_token_id)

    def settings(self) -> dict[str, Any]:
        """What produces this editor's edits: recorded with every edit in the ledger."""
        return {"method": self.method, "profile": self.hparams.profile, "hparams": self.hparams.to_dict()}

    def info(self) -> dict:
        memory = self.store.memory_bytes()
        return {
            "method": self.method,
            "profile": self.hparams.profile,
            "factor_store_bytes": memory,
            "layers": self.layers,
            "null_space_dims": {layer: ns.kept for layer, ns in self.null_spaces.items()},
            "null_space_fraction": {layer: round(ns.kept_fraction, 4) for layer, ns in self.null_spaces.items()},
            "active_edits": len(self.store),
            "hparams": self.hparams.to_dict(),
        }

    def close(self) -> None:
        self.trace.close()


def _digest(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _metrics_from(requests: Sequence[EditRequest], plan: list, scores: list[Score]) -> list[RequestMetrics]:
    metrics = [RequestMetrics() for _ in requests]
    for (j, section, i, name), score in zip(plan, scores):
        probability = float(torch.tensor(score.mean_logprob).exp())
        if section == "prompt":
            metrics[j].prompt[name] = probability
        else:
            entries = getattr(metrics[j], section)
            while len(entries) <= i:
                entries.append({})
            entries[i][name] = probability
    return metrics
