"""The paper's sequential protocol: n cases edited in batches, in order, never undone; every case
scored on the final model, after scoring the unedited model on the same cases.

Checkpoints every k edits score the cases edited so far, the knowns control and the held-out
perplexity, for degradation curves. The protocol only talks to a `Target`, so it runs the same
in-process and against a service over HTTP.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Any

from tqdm.auto import tqdm

from evaluation import metrics
from evaluation.targets import BatchOutcome, Target
from evaluation.data import Dataset, EditCase, HeldOutText, KnownFact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProtocolSettings:
    dataset: Dataset
    batch_size: int
    checkpoint_every: int | None = None  # None: baseline and final only
    fluency_tokens: int = 100  # 0: no fluency
    control_tokens: int = 8  # greedy tokens compared for the knowns control
    checkpoints: tuple[int, ...] = ()  # explicit checkpoint edit counts (instead of checkpoint_every)
    sample: int | None = None  # score a fixed random sample of at most this many of the cases edited so far
    sample_seed: int = 0
    first_k: int | None = None  # also report the case metrics of the first k cases (do early edits fade?)
    fluency_n: int | None = None  # fluency at every checkpoint on this many sampled cases (None: all, ends only)


def sample_indices(n: int, edited: int, size: int | None, seed: int) -> list[int]:
    """The first `size` indices below `edited` of one fixed permutation of range(n): the sample
    grows with the cases edited, and later checkpoints keep the earlier sample's cases."""
    if size is None or size >= edited:
        return list(range(edited))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted([i for i in order if i < edited][:size])


@dataclass(frozen=True)
class EvalInputs:
    cases: Sequence[EditCase]
    knowns: Sequence[KnownFact]
    heldout: HeldOutText | None


@contextmanager
def _stage(what: str) -> Iterator[None]:
    """Scoring 500 cases takes minutes on a CPU: say what runs, and how long it took."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - start)


class _Scorer:
    """Scores a model state: case metrics, and the shared control / perplexity / fluency."""

    def __init__(self, target: Target, inputs: EvalInputs, settings: ProtocolSettings) -> None:
        self.target, self.inputs, self.settings = target, inputs, settings
        self.references: list[str] = []

    def take_references(self) -> None:
        """Called on the unedited model: what the control prompts should keep producing."""
        self.references = metrics.control_references(self.target, self.inputs.knowns, self.settings.control_tokens)

    def __call__(self, cases: Sequence[EditCase], fluency: bool,
                 first: Sequence[EditCase] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
        """Summary numbers, and the per-case details (scores, generations, control continuations)."""
        with _stage(f"{self.settings.dataset} metrics of {len(cases)} cases"):
            summary, per_case = metrics.CASE_METRICS[self.settings.dataset](self.target, cases)
        details: dict[str, Any] = {"cases": per_case}
        if first:
            summary["first_k"] = metrics.CASE_METRICS[self.settings.dataset](self.target, first)[0]
        fluent = cases[: self.settings.fluency_n] if self.settings.fluency_n else cases
        if (fluency or self.settings.fluency_n) and self.settings.fluency_tokens:
            with _stage(f"fluency: {len(fluent)} generations of {self.settings.fluency_tokens} tokens"):
                summary["fluency"], details["generations"] = metrics.fluency_metric(
                    self.target, fluent, self.settings.fluency_tokens)
        with _stage("perplexity and control"):
            summary["perplexity"] = self._perplexity()
            control, details["control"] = metrics.control_metrics(
                self.target, self.inputs.knowns, self.references, self.settings.control_tokens)
        summary.update(control)
        summary["cases"] = len(cases)
        return summary, details

    def _perplexity(self) -> float | None:
        if self.inputs.heldout is None:
            return None
        return metrics.perplexity_metric(self.target, self.inputs.heldout)


def _batch_record(index: int, first_case: int, outcome: BatchOutcome, seconds: float) -> dict[str, Any]:
    record = {"index": index, "first_case": first_case, **asdict(outcome), "seconds": seconds}
    record["steps_mean"] = fmean(outcome.steps) if outcome.steps else None
    record["target_nll_mean"] = fmean(outcome.target_nll) if outcome.target_nll else None
    return record


class _Protocol:
    """The state of one run: batches applied so far, checkpoints, timings."""

    def __init__(self, target: Target, inputs: EvalInputs, settings: ProtocolSettings,
                 on_checkpoint: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.target, self.settings, self.cases = target, settings, list(inputs.cases)
        self.score = _Scorer(target, inputs, settings)
        self.on_checkpoint = on_checkpoint
        self.timings: dict[str, float] = {"checkpoint_eval_s": 0.0}
        self.checkpoints: list[dict[str, Any]] = []
        self.batches: list[dict[str, Any]] = []
        self.applied = 0

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def scored(self, edited: int, fluency: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Score the (sampled) cases among the first `edited`, and the first k of them apart."""
        s = self.settings
        chosen = sample_indices(len(self.cases), edited, s.sample, s.sample_seed)
        first = [self.cases[i] for i in chosen if s.first_k and i < s.first_k] if s.first_k else []
        summary, details = self.score([self.cases[i] for i in chosen], fluency, first)
        details["indices"] = chosen
        return summary, details

    def baseline(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self.score.take_references()
        return self.scored(len(self.cases), fluency=True)

    def _due(self) -> list[int]:
        s, n = self.settings, len(self.cases)
        if s.checkpoints:
            return sorted(c for c in s.checkpoints if 0 < c < n)
        return list(range(s.checkpoint_every, n, s.checkpoint_every)) if s.checkpoint_every else []

    def edit_all(self, progress: bool) -> None:
        """Every batch in order; a checkpoint at the first batch boundary at or past each one due."""
        due, size = self._due(), self.settings.batch_size
        desc = f"{self.target.kind} {self.settings.dataset}"
        with tqdm(total=len(self.cases), unit="edit", desc=desc, disable=not progress) as bar:
            for index, first in enumerate(range(0, len(self.cases), size)):
                edited = self._apply(index, first)
                bar.update(edited - first)
                bar.set_postfix(batch_s=f"{self.batches[-1]['seconds']:.1f}", failed=edited - self.applied)
                if due and due[0] <= edited < len(self.cases):
                    self.timed("checkpoint_eval_s", lambda: self._checkpoint(edited))
                    due = [d for d in due if d > edited]

    def _apply(self, index: int, first: int) -> int:
        batch = self.cases[first : first + self.settings.batch_size]
        start = time.perf_counter()
        outcome = self.target.apply([c.request() for c in batch], batch_id=f"eval-{index:05d}")
        self.batches.append(_batch_record(index, first, outcome, time.perf_counter() - start))
        self.applied += len(batch) if outcome.applied else 0
        record = self.batches[-1]
        log.info("batch %d: %d edits %s in %.1f s (mean target steps %s, NLL %s)", index, len(batch),
                 "applied" if outcome.applied else f"FAILED ({outcome.error})", record["seconds"],
                 _fmt(record["steps_mean"]), _fmt(record["target_nll_mean"]))
        return first + len(batch)

    def _checkpoint(self, edited: int) -> None:
        summary, _ = self.scored(edited, fluency=False)
        self.checkpoints.append({"edits": edited, "applied": self.applied, **summary})
        log.info("checkpoint at %d edits: %s", edited, _headline(summary))
        if self.on_checkpoint is not None:
            self.on_checkpoint({"checkpoints": self.checkpoints, "batches": self.batches,
                                "edits_applied": self.applied, "timings": self.timings, "partial": True})


def run_protocol(target: Target, inputs: EvalInputs, settings: ProtocolSettings, progress: bool = True,
                 on_checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Baseline, sequential edits with checkpoints, final scores. Returns the results (no config).
    `on_checkpoint` gets the results so far after each checkpoint (long runs save them as they go)."""
    run = _Protocol(target, inputs, settings, on_checkpoint)
    start = time.perf_counter()
    baseline, baseline_details = run.timed("baseline_eval_s", run.baseline)
    run.checkpoints.append({"edits": 0, "applied": 0, **baseline})
    run.timed("editing_s", lambda: run.edit_all(progress))
    run.timings["editing_s"] -= run.timings["checkpoint_eval_s"]
    final, final_details = run.timed("final_eval_s", lambda: run.scored(len(run.cases), fluency=True))
    run.checkpoints.append({"edits": len(run.cases), "applied": run.applied, **final})
    run.timings["protocol_s"] = time.perf_counter() - start
    return {
        "baseline": baseline,
        "final": final,
        "checkpoints": run.checkpoints,
        "batches": run.batches,
        "edits_applied": run.applied,
        "edits_failed": len(run.cases) - run.applied,
        "timings": run.timings,
        "case_results": {"baseline": baseline_details, "final": final_details},
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _headline(summary: dict[str, Any]) -> str:
    keys = ("efficacy", "generalisation", "specificity", "control_retained", "perplexity")
    return ", ".join(f"{k} {summary[k]:.1f}" for k in keys if summary.get(k) is not None)
