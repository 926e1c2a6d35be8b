"""The HTTP target (`knowpatch eval --url`) against a real `knowpatch serve` on SmolLM2: edits go
through POST /edits and the worker, reads through /score and /generate, all over loopback HTTP."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.engine.types import EditRequest
from service.errors import InvalidRequest, Unauthorized
from evaluation.targets import Query
from evaluation.data import load_cases, load_heldout, load_knowns
from evaluation.targets.service import ServiceTarget
from evaluation.runner import EvalInputs, ProtocolSettings, run_protocol
from tests.conftest import shared_data
from tests.e2e.conftest import Process, free_port, service_env

pytestmark = pytest.mark.slow

KEY = "eval-key"


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded service (API + worker, SQLite ledger, AlphaEdit) for this module."""
    root = tmp_path_factory.mktemp("eval-remote")
    env = {**service_env(root / "data"), "KNOWPATCH_API_KEYS": f"eval:{KEY}:edits:write,generate"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = Process(["serve", "--port", str(port)], env, root / "serve.log").start(f"{url}/ready")
    yield url
    process.stop()


def _target(url: str, key: str = KEY, method: str = "alphaedit") -> ServiceTarget:
    return ServiceTarget(url, key, method=method, poll_interval_s=0.2, timeout_s=300)


def test_protocol_over_http_edits_in_batches_and_reads_its_own_writes(service_url):
    target = _target(service_url)
    inputs = EvalInputs(load_cases("counterfact", shared_data("counterfact"), n=4).cases,
                        load_knowns(shared_data("knowns"), count=3), load_heldout(shared_data("wikitext"), chunks=1))
    settings = ProtocolSettings("counterfact", batch_size=2, fluency_tokens=8, control_tokens=4)
    results = run_protocol(target, inputs, settings, progress=False)
    target.close()
    assert results["baseline"]["efficacy"] <= 50.0 and results["final"]["efficacy"] >= 75.0, results["final"]
    assert results["final"]["efficacy_top1"] is None and results["final"]["control_top1"] is None  # no argmax over HTTP
    assert results["final"]["perplexity"] > 1 and results["final"]["fluency"] > 0
    versions = [b["model_version"] for b in results["batches"]]
    assert len(versions) == 2 and 0 < versions[0] < versions[1], versions  # each batch reported its own version
    assert target.min_version == versions[-1]  # later reads ask for the version that holds every batch
    listed = httpx.get(f"{service_url}/edits", params={"limit": 4}, headers={"Authorization": f"Bearer {KEY}"}).json()
    items = list(reversed(listed["items"]))
    assert [i["subject"] for i in items] == [c.subject for c in inputs.cases]
    assert [i["request"]["metadata"]["batch"] for i in items] == ["eval-00000"] * 2 + ["eval-00001"] * 2
    assert all(i["method"] == "alphaedit" and not i["request"].get("rephrase_prompts") for i in items)  # only the edit


def test_an_edit_the_service_refuses_is_reported_with_its_reason(service_url):
    target = _target(service_url, method="memit")  # the service applies AlphaEdit only
    case = load_cases("counterfact", shared_data("counterfact"), n=5).cases[4]
    outcome = target.apply([case.request()], "refused")
    target.close()
    assert not outcome.applied and outcome.size == 1
    assert "failed" in outcome.error and "method memit is not enabled" in outcome.error


def test_score_groups_candidates_per_prompt_and_keeps_the_order(service_url):
    target = _target(service_url)
    prompt = "The Eiffel Tower is located in the city of"
    queries = [Query(prompt, "Paris"), Query("The capital of Japan is", "Tokyo"), Query(prompt, "Rome"),
               Query(prompt, "Paris")]
    scores = target.score(queries)
    alone = [target.score([q])[0] for q in queries]
    target.close()
    assert [s.total_logprob for s in scores] == pytest.approx([s.total_logprob for s in alone], abs=1e-4)
    assert scores[0].total_logprob == scores[3].total_logprob > scores[2].total_logprob  # Paris over Rome
    assert all(s.top1 is None for s in scores)


def test_http_errors_map_to_the_project_errors(service_url):
    with pytest.raises(Unauthorized, match="key"):
        _target(service_url, key="wrong").generate(["x"], 5)
    with pytest.raises(InvalidRequest, match="candidates"):
        _target(service_url)._score_prompt(("p", []))
    with pytest.raises(InvalidRequest, match="subject"):
        _target(service_url).apply([EditRequest("Nowhere", "Somewhere is in", "Rome", None)], "bad")
