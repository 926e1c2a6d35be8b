"""Quality gates: what an edit's pending weights must satisfy before they are served.

Plain data and arithmetic on the editor's measurements (no torch here: the API parses per-edit
gates with it). A gate set combines the server's (KNOWPATCH_GATE_*) with the edit's own: the edit's
thresholds replace the server's, its probes are added to the server's.

- efficacy: P(target_new | prompt) after the edit (mean per-token probability), at least min_efficacy.
- generalisation: the mean of that over the rephrase prompts (none given: not gated).
- locality drop: the largest rise of P(target_new) on a locality prompt, i.e. how far an unrelated
  prompt moved towards the new target; at most max_locality_drop.
- probes: each expected continuation must stay the greedy one (every token the argmax). A probe gates
  only if it held before the edit (an edit cannot be blamed for a fact the model did not know), and a
  server probe is skipped for an edit whose subject it names (that edit may mean to change it).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.engine.types import EditRequest, RequestMetrics
from service.errors import InvalidRequest

if TYPE_CHECKING:
    from service.config import Settings

# (prompts, expected continuations, pending or not) -> whether each expected continuation is greedy
ProbeCheck = Callable[[Sequence["Probe"], bool], list[bool]]


@dataclass(frozen=True)
class Probe:
    prompt: str
    expected: str
    server: bool = False  # from the server's set (skipped for an edit whose subject it names)

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "expected": self.expected}


@dataclass(frozen=True)
class Gates:
    min_efficacy: float | None = None
    min_generalisation: float | None = None
    max_locality_drop: float | None = None
    probes: tuple[Probe, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, server: bool = False) -> "Gates":
        data = data or {}
        try:
            probes = tuple(Probe(str(p["prompt"]), str(p["expected"]), server) for p in data.get("probes") or ())
        except (KeyError, TypeError) as exc:
            raise InvalidRequest(f"gates: a probe needs 'prompt' and 'expected' ({exc})") from None
        return cls(data.get("min_efficacy"), data.get("min_generalisation"), data.get("max_locality_drop"), probes)

    def to_dict(self) -> dict[str, Any]:
        return {"min_efficacy": self.min_efficacy, "min_generalisation": self.min_generalisation,
                "max_locality_drop": self.max_locality_drop, "probes": [p.to_dict() for p in self.probes]}

    def merged(self, own: "Gates") -> "Gates":
        """The server's gates (self) with an edit's own on top."""
        def pick(name: str) -> Any:
            value = getattr(own, name)
            return getattr(self, name) if value is None else value
        return replace(self, min_efficacy=pick("min_efficacy"), min_generalisation=pick("min_generalisation"),
                       max_locality_drop=pick("max_locality_drop"), probes=self.probes + own.probes)


def shipped_probes() -> tuple[Probe, ...]:
    """The default server probes, facts the unedited SmolLM2 completes greedily."""
    data = json.loads((resources.files("service.engine") / "default_probes.json").read_text())
    return tuple(Probe(p["prompt"], p["expected"], server=True) for p in data["probes"])


def server_gates(min_efficacy: float | None = None, min_generalisation: float | None = None,
                 max_locality_drop: float | None = None, probes: str = "default") -> Gates:
    """The server-wide set. probes: 'default' (the shipped file), 'none', or a JSON file of
    {"probes": [{"prompt", "expected"}]}."""
    if probes == "default":
        loaded = shipped_probes()
    elif probes == "none":
        loaded = ()
    else:
        data = json.loads(Path(probes).read_text())
        loaded = tuple(Probe(p["prompt"], p["expected"], server=True) for p in data["probes"])
    return Gates(min_efficacy, min_generalisation, max_locality_drop, loaded)


@dataclass
class GateReport:
    """One edit's gate results: {name: {value, threshold, passed}}; failed names the first gate that failed."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed(self) -> str | None:
        return next((name for name, r in self.results.items() if not r["passed"]), None)

    def reason(self) -> str:
        name = self.failed
        if name is None:
            return ""
        r = self.results[name]
        return f"rejected by the quality gate {name}: {r['value']} (threshold {r['threshold']}); the model is unchanged"


def evaluate(gates: Gates, request: EditRequest, before: RequestMetrics, after: RequestMetrics,
             probe_check: ProbeCheck) -> GateReport:
    """Measure `gates` for one edit from its metrics before/after and the probes on current/pending weights."""
    report = GateReport()
    efficacy = after.prompt.get("target_new", 0.0)
    _threshold(report, "efficacy", efficacy, gates.min_efficacy, lower=True)
    if after.rephrase:
        general = sum(r.get("target_new", 0.0) for r in after.rephrase) / len(after.rephrase)
        _threshold(report, "generalisation", general, gates.min_generalisation, lower=True)
    if after.locality:
        drop = max(a.get("target_new", 0.0) - b.get("target_new", 0.0) for a, b in zip(after.locality, before.locality))
        _threshold(report, "locality_drop", drop, gates.max_locality_drop, lower=False)
    probes = [p for p in gates.probes if not (p.server and request.subject.lower() in p.prompt.lower())]
    if probes:
        held_before, held_after = probe_check(probes, False), probe_check(probes, True)
        for probe, was, still in zip(probes, held_before, held_after):
            report.results[f"probe:{probe.prompt}"] = {
                "value": still, "threshold": probe.expected, "held_before": was, "passed": still or not was}
    return report


def _threshold(report: GateReport, name: str, value: float, threshold: float | None, *, lower: bool) -> None:
    if threshold is None:
        return
    passed = value >= threshold if lower else value <= threshold
    report.results[name] = {"value": round(value, 6), "threshold": threshold, "passed": passed}


def gates_from_settings(settings: "Settings") -> Gates:
    """The server-wide set from KNOWPATCH_GATE_* (what the entry point passes to the Worker)."""
    return server_gates(settings.gate_min_efficacy, settings.gate_min_generalisation,
                        settings.gate_max_locality_drop, settings.gate_probes)
