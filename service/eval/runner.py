"""The paper's sequential protocol: n cases edited in batches, in order, never undone; every case
scored on the final model, after scoring the unedited model on the same cases.

Checkpoints every k edits score the cases edited so far, the knowns control and the held-out
perplexity, for degradation curves. The protocol only talks to a `Backend`, so it runs the same
in-process and against a service over HTTP.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Any

from tqdm.auto import tqdm

from service.eval import metrics
from service.eval.backend import Backend, BatchOutcome
from service.eval.data import Dataset, EditCase, HeldOutText, KnownFact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProtocolSettings:
    dataset: Dataset
    batch_size: int
    checkpoint_every: int | None = None  # None: baseline and final only
    fluency_tokens: int = 100  # 0: no fluency
    control_tokens: int = 8  # greedy tokens compared for the knowns control


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

    def __init__(self, backend: Backend, inputs: EvalInputs, settings: ProtocolSettings) -> None:
        self.backend, self.inputs, self.settings = backend, inputs, settings
        self.references: list[str] = []

    def take_references(self) -> None:
        """Called on the unedited model: what the control prompts should keep producing."""
        self.references = metrics.control_references(self.backend, self.inputs.knowns, self.settings.control_tokens)

    def __call__(self, cases: Sequence[EditCase], fluency: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Summary numbers, and the per-case details (scores, generations, control continuations)."""
        with _stage(f"{self.settings.dataset} metrics of {len(cases)} cases"):
            summary, per_case = metrics.CASE_METRICS[self.settings.dataset](self.backend, cases)
        details: dict[str, Any] = {"cases": per_case}
        if fluency and self.settings.fluency_tokens:
            with _stage(f"fluency: {len(cases)} generations of {self.settings.fluency_tokens} tokens"):
                summary["fluency"], details["generations"] = metrics.fluency_metric(
                    self.backend, cases, self.settings.fluency_tokens)
        with _stage("perplexity and control"):
            summary["perplexity"] = self._perplexity()
            control, details["control"] = metrics.control_metrics(
                self.backend, self.inputs.knowns, self.references, self.settings.control_tokens)
        summary.update(control)
        summary["cases"] = len(cases)
        return summary, details

    def _perplexity(self) -> float | None:
        if self.inputs.heldout is None:
            return None
        return metrics.perplexity_metric(self.backend, self.inputs.heldout)


def _batch_record(index: int, first_case: int, outcome: BatchOutcome, seconds: float) -> dict[str, Any]:
    record = {"index": index, "first_case": first_case, **asdict(outcome), "seconds": seconds}
    record["steps_mean"] = fmean(outcome.steps) if outcome.steps else None
    record["target_nll_mean"] = fmean(outcome.target_nll) if outcome.target_nll else None
    return record


class _Protocol:
    """The state of one run: batches applied so far, checkpoints, timings."""

    def __init__(self, backend: Backend, inputs: EvalInputs, settings: ProtocolSettings) -> None:
        self.backend, self.settings, self.cases = backend, settings, list(inputs.cases)
        self.score = _Scorer(backend, inputs, settings)
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

    def baseline(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self.score.take_references()
        return self.score(self.cases, fluency=True)

    def edit_all(self, progress: bool) -> None:
        """Every batch in order; a checkpoint at the first batch boundary at or past each k edits."""
        every, size = self.settings.checkpoint_every, self.settings.batch_size
        due = every or len(self.cases) + 1
        desc = f"{self.backend.kind} {self.settings.dataset}"
        with tqdm(total=len(self.cases), unit="edit", desc=desc, disable=not progress) as bar:
            for index, first in enumerate(range(0, len(self.cases), size)):
                edited = self._apply(index, first)
                bar.update(edited - first)
                bar.set_postfix(batch_s=f"{self.batches[-1]['seconds']:.1f}", failed=edited - self.applied)
                if due <= edited < len(self.cases):
                    self.timed("checkpoint_eval_s", lambda: self._checkpoint(edited))
                    due = (edited // every + 1) * every

    def _apply(self, index: int, first: int) -> int:
        batch = self.cases[first : first + self.settings.batch_size]
        start = time.perf_counter()
        outcome = self.backend.apply([c.request() for c in batch], batch_id=f"eval-{index:05d}")
        self.batches.append(_batch_record(index, first, outcome, time.perf_counter() - start))
        self.applied += len(batch) if outcome.applied else 0
        return first + len(batch)

    def _checkpoint(self, edited: int) -> None:
        summary, _ = self.score(self.cases[:edited], fluency=False)
        self.checkpoints.append({"edits": edited, "applied": self.applied, **summary})
        log.info("checkpoint at %d edits: %s", edited, _headline(summary))


def run_protocol(backend: Backend, inputs: EvalInputs, settings: ProtocolSettings,
                 progress: bool = True) -> dict[str, Any]:
    """Baseline, sequential edits with checkpoints, final scores. Returns the results (no config)."""
    run = _Protocol(backend, inputs, settings)
    start = time.perf_counter()
    baseline, baseline_details = run.timed("baseline_eval_s", run.baseline)
    run.checkpoints.append({"edits": 0, "applied": 0, **baseline})
    run.timed("editing_s", lambda: run.edit_all(progress))
    run.timings["editing_s"] -= run.timings["checkpoint_eval_s"]
    final, final_details = run.timed("final_eval_s", lambda: run.score(run.cases, fluency=True))
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


def _headline(summary: dict[str, Any]) -> str:
    keys = ("efficacy", "generalisation", "specificity", "control_retained", "perplexity")
    return ", ".join(f"{k} {summary[k]:.1f}" for k in keys if summary.get(k) is not None)
