"""Quality gates: the arithmetic on measurements, merging the server's and an edit's own, and the
shipped default probes holding on the unedited SmolLM2."""
from __future__ import annotations

from collections.abc import Sequence

import pytest

from service.config import Settings
from service.engine.gates import Gates, Probe, evaluate, gates_from_settings, server_gates, shipped_probes
from service.engine.scoring import continuation_row, score_rows
from service.engine.types import EditRequest, RequestMetrics
from service.model.adapters import ModelAdapter
from tests.engine.conftest import smollm2  # noqa: F401 (fixture)

REQUEST = EditRequest("Eiffel Tower", "The Eiffel Tower is in", "Rome", "Paris")


def metrics(new: float, rephrase: Sequence[float] = (), locality: Sequence[float] = ()) -> RequestMetrics:
    return RequestMetrics({"target_new": new}, [{"target_new": p} for p in rephrase],
                          [{"target_new": p} for p in locality])


def no_probes(probes: Sequence[Probe], pending: bool) -> list[bool]:
    raise AssertionError("no probe should be scored")


def test_thresholds_pass_and_fail_and_off_gates_are_not_reported() -> None:
    gates = Gates(min_efficacy=0.5, min_generalisation=0.4, max_locality_drop=0.1)
    before, after = metrics(0.1, [0.1], [0.1, 0.2]), metrics(0.9, [0.3, 0.4], [0.15, 0.25])
    report = evaluate(gates, REQUEST, before, after, no_probes)
    assert report.results["efficacy"] == {"value": 0.9, "threshold": 0.5, "passed": True}
    assert report.results["generalisation"]["value"] == pytest.approx(0.35) and report.failed == "generalisation"
    assert report.results["locality_drop"]["value"] == pytest.approx(0.05)
    assert "generalisation" in report.reason()
    assert evaluate(Gates(), REQUEST, before, after, no_probes).results == {}


def test_a_probe_fails_only_when_the_edit_breaks_what_held_before() -> None:
    probes = (Probe("a", " x"), Probe("b", " y"), Probe("c", " z"))
    held = {(" x", False): True, (" x", True): False, (" y", False): False, (" y", True): False,
            (" z", False): True, (" z", True): True}

    def check(asked: Sequence[Probe], pending: bool) -> list[bool]:
        return [held[(p.expected, pending)] for p in asked]

    report = evaluate(Gates(probes=probes), REQUEST, metrics(0.5), metrics(0.9), check)
    assert {name: r["passed"] for name, r in report.results.items()} == {"probe:a": False, "probe:b": True,
                                                                         "probe:c": True}
    assert report.failed == "probe:a"


def test_a_server_probe_naming_the_subject_is_skipped_an_edits_own_is_not() -> None:
    asked: list[str] = []

    def check(probes: Sequence[Probe], pending: bool) -> list[bool]:
        asked.extend(p.prompt for p in probes)
        return [True] * len(probes)

    server = Gates(min_efficacy=0.2, probes=(Probe("The Eiffel Tower stands in", " Paris", server=True),))
    gates = server.merged(Gates.from_dict({"min_efficacy": 0.9, "probes": [
        {"prompt": "The eiffel tower is made of", "expected": " iron"}]}))
    assert gates.min_efficacy == 0.9 and gates.min_generalisation is None and len(gates.probes) == 2
    evaluate(gates, REQUEST, metrics(0.1), metrics(0.95), check)
    assert asked == ["The eiffel tower is made of"] * 2  # before and after


def test_server_gates_from_settings_values() -> None:
    assert server_gates().probes == shipped_probes() and len(shipped_probes()) >= 3
    assert server_gates(probes="none", min_efficacy=0.3) == Gates(min_efficacy=0.3)
    settings = Settings(gate_min_generalisation=0.2, gate_probes="none")
    assert gates_from_settings(settings) == Gates(min_generalisation=0.2)


@pytest.mark.slow
def test_the_shipped_probes_hold_on_the_unedited_smollm2(smollm2) -> None:  # noqa: F811
    adapter, tokenizer = ModelAdapter(smollm2.model), smollm2.tokenizer
    rows = [continuation_row(tokenizer, p.prompt, p.expected) for p in shipped_probes()]
    scores = score_rows(adapter, None, rows, tokenizer.pad_token_id)
    assert [s.top1_correct for s in scores] == [True] * len(rows), [p.prompt for p in shipped_probes()]
