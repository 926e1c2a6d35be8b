"""The paper's sequential protocol: n cases edited in batches, in order, never undone; every case
scored on the final model, after scoring the unedited model on the same cases.

Checkpoints every k edits score the cases edited so far, the knowns control and the held-out
perplexity, for degradation curves. The protocol only talks to a `Backend`, so it runs the same
in-process and against a service over HTTP.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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
        summary, per_case = metrics.CASE_METRICS[self.settings.dataset](self.backend, cases)
        details: dict[str, Any] = {"cases": per_case}
        if fluency and self.settings.fluency_tokens:
            summary["fluency"], details["generations"] = metrics.fluency_metric(
                self.backend, cases, self.settings.fluency_tokens)
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


def run_protocol(backend: Backend, inputs: EvalInputs, settings: ProtocolSettings, progress: bool = True) -> dict[str, Any]:
    """Baseline, sequential edits with checkpoints, final scores. Returns the results (no config)."""
    cases, every = list(inputs.cases), settings.checkpoint_every
    score = _Scorer(backend, inputs, settings)
    timings: dict[str, float] = {"checkpoint_eval_s": 0.0}
    start = time.perf_counter()
    score.take_references()
    baseline, baseline_details = score(cases, fluency=True)
    timings["baseline_eval_s"] = time.perf_counter() - start
    checkpoints = [{"edits": 0, "applied": 0, **baseline}]
    batches: list[dict[str, Any]] = []
    next_checkpoint, applied = every or len(cases) + 1, 0
    editing_start = time.perf_counter()
    with tqdm(total=len(cases), unit="edit", desc=f"{backend.kind} {settings.dataset}", disable=not progress) as bar:
        for index, first in enumerate(range(0, len(cases), settings.batch_size)):
            batch = cases[first : first + settings.batch_size]
            batch_start = time.perf_counter()
            outcome = backend.apply([c.request() for c in batch], batch_id=f"eval-{index:05d}")
            batches.append(_batch_record(index, first, outcome, time.perf_counter() - batch_start))
            applied += len(batch) if outcome.applied else 0
            edited = first + len(batch)
            bar.update(len(batch))
            bar.set_postfix(batch_s=f"{batches[-1]['seconds']:.1f}", failed=edited - applied)
            if edited >= next_checkpoint and edited < len(cases):
                checkpoint_start = time.perf_counter()
                summary, _ = score(cases[:edited], fluency=False)
                checkpoints.append({"edits": edited, "applied": applied, **summary})
                timings["checkpoint_eval_s"] += time.perf_counter() - checkpoint_start
                log.info("checkpoint at %d edits: %s", edited, _headline(summary))
                next_checkpoint = (edited // every + 1) * every
    timings["editing_s"] = time.perf_counter() - editing_start - timings["checkpoint_eval_s"]
    final_start = time.perf_counter()
    final, final_details = score(cases, fluency=True)
    timings["final_eval_s"] = time.perf_counter() - final_start
    timings["protocol_s"] = time.perf_counter() - start
    checkpoints.append({"edits": len(cases), "applied": applied, **final})
    return {
        "baseline": baseline,
        "final": final,
        "checkpoints": checkpoints,
        "batches": batches,
        "edits_applied": applied,
        "edits_failed": len(cases) - applied,
        "timings": timings,
        "case_results": {"baseline": baseline_details, "final": final_details},
    }


def _headline(summary: dict[str, Any]) -> str:
    keys = ("efficacy", "generalisation", "specificity", "control_retained", "perplexity")
    return ", ".join(f"{k} {summary[k]:.1f}" for k in keys if summary.get(k) is not None)
