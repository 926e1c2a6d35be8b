"""Schemathesis against the running API (tests/chaos/fuzz.py): a bounded number of generated requests
per operation in CI (KNOWPATCH_CHAOS_FUZZ_EXAMPLES, default 3 per operation and mode; bench/chaos.py
runs more). No server error but the documented 503, every response as documented, nothing left
pending in the ledger afterwards and no key in the logs."""
from __future__ import annotations

import os
import uuid

import httpx
import pytest

from tests.chaos.cluster import Cluster, wait_for
from tests.chaos.fuzz import fuzz
from tests.chaos.invariants import check_ledger, pending_operations
from tests.chaos.workload import Accepted

EXAMPLES = int(os.environ.get("KNOWPATCH_CHAOS_FUZZ_EXAMPLES", "3"))


@pytest.mark.slow
def test_fuzzing_finds_no_server_error_and_no_undocumented_answer(cluster: Cluster) -> None:
    report = fuzz(cluster.api_url, cluster.keys.everything, EXAMPLES, seed=0)
    print(report.figures())
    assert report.operations >= 15 and report.requests >= report.operations
    assert not report.server_errors, "\n".join(report.server_errors[:20])
    assert not report.failures, "\n".join(report.failures[:20])
    wait_for(lambda: pending_operations(cluster.sessions) == 0, "the fuzzed edits are processed", 600, 0.5)
    findings = check_ledger(cluster.sessions, Accepted(), layers=3)  # every edit, fuzzed ones included
    assert not findings.problems, "\n".join(findings.problems[:20])
    for log in ("api.log", "worker.log"):
        text = (cluster.workdir / log).read_text(errors="replace")
        assert not [k for k in cluster.keys.all() + [cluster.internal_token] if k in text], f"a key in {log}"


def test_malformed_json_is_answered_with_a_documented_status(cluster: Cluster) -> None:
    spec = httpx.get(f"{cluster.api_url}/openapi.json", timeout=30).json()
    undocumented = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if "requestBody" not in operation:
                continue
            reply = httpx.request(method, cluster.api_url + path.replace("{edit_id}", str(uuid.uuid4())),
                                  content=b'{"inputs": ', timeout=60,
                                  headers={"Authorization": f"Bearer {cluster.keys.everything}",
                                           "Content-Type": "application/json"})
            assert reply.status_code < 500, (method, path, reply.text)
            if str(reply.status_code) not in operation["responses"]:
                undocumented.append(f"{method.upper()} {path}: {reply.status_code}")
    assert not undocumented, undocumented
