"""The fault trials, one of each kind (the long form, bench/chaos.py, runs 30 and more): the split
worker SIGKILLed at a random moment and at each named fault point, Redis SIGKILLed and restarted
empty (alone, and together with the worker), the cluster's private Postgres stopped (-m fast, then
-m immediate) and started again, and the API SIGKILLed between a ledger write and its enqueue, each
with a random mix of edits, lists of edits, rollbacks, cancels and Idempotency-Key retries in flight
over HTTP. After the worker has caught up, every invariant of tests/chaos/invariants.py must hold
(see there)."""
from __future__ import annotations

import pytest

from tests.chaos.cluster import Cluster
from tests.chaos.trials import API_KILLS, FAULT_POINTS, KINDS, POSTGRES_STOPS, Replayer, run_trial

pytestmark = pytest.mark.slow  # each trial starts one or two worker processes


@pytest.mark.parametrize("kind", KINDS)
def test_a_fault_loses_nothing_and_duplicates_nothing(cluster: Cluster, replayer: Replayer, kind: str) -> None:
    if kind in POSTGRES_STOPS and cluster.private_postgres is None:
        pytest.skip(f"the Postgres-outage trial needs a private Postgres cluster: {cluster.private_postgres_missing}")
    result = run_trial(cluster, replayer, kind, seed=KINDS.index(kind))
    print(result.as_dict())
    assert result.ok, "\n".join(result.problems)
    assert result.accepted_edits + result.accepted_rollbacks > 0
    if kind in FAULT_POINTS:
        assert result.fault_reached, f"the worker never reached {kind}: the trial only killed it"
    if kind in API_KILLS:
        assert result.fault_reached, "the API never died after a ledger write: the trial tested nothing"
    if kind in POSTGRES_STOPS:
        assert result.postgres_stops == ["fast", "immediate"]
        assert result.unavailable > 0, "no request met the outage (no 503 Unavailable)"
