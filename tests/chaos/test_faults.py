"""The fault trials, one of each kind (the long form, bench/chaos.py, runs 30 and more): the split
worker SIGKILLed at a random moment and at each named fault point, Redis SIGKILLed and restarted
empty (alone, and together with the worker), each with a random mix of edits, lists of edits,
rollbacks, cancels and Idempotency-Key retries in flight over HTTP. After a fresh worker has caught
up, every invariant of tests/chaos/invariants.py must hold (see there)."""
from __future__ import annotations

import pytest

from tests.chaos.cluster import Cluster
from tests.chaos.trials import FAULT_POINTS, KINDS, Replayer, run_trial

pytestmark = pytest.mark.slow  # each trial starts one or two worker processes


@pytest.mark.parametrize("kind", KINDS)
def test_a_fault_loses_nothing_and_duplicates_nothing(cluster: Cluster, replayer: Replayer, kind: str) -> None:
    result = run_trial(cluster, replayer, kind, seed=KINDS.index(kind))
    print(result.as_dict())
    assert result.ok, "\n".join(result.problems)
    assert result.accepted_edits + result.accepted_rollbacks > 0
    if kind in FAULT_POINTS:
        assert result.fault_reached, f"the worker never reached {kind}: the trial only killed it"
