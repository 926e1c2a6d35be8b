"""The HTTP backend against a fake service that follows the API contract (httpx.MockTransport)."""
from __future__ import annotations

import json

import httpx
import pytest

from service.engine.types import EditRequest
from service.errors import InvalidRequest, Unauthorized
from service.eval.backend import Query
from service.eval.data import load_cases, load_heldout, load_knowns
from service.eval.remote import HttpBackend
from service.eval.runner import EvalInputs, ProtocolSettings, run_protocol


class FakeService:
    """Applies an edit on its second GET (the first sees it 'applying'); a candidate scores high once an
    applied edit gave it as the new target of a subject named in the prompt."""

    def __init__(self, key: str = "secret") -> None:
        self.key = key
        self.edits: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.version = 0
        self.min_versions: list[int | None] = []
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"detail": "missing or unknown API key"})
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        if request.method == "POST" and path == "/edits":
            return self._submit(body)
        if request.method == "GET" and path.startswith("/edits/"):
            return self._poll(path.rsplit("/", 1)[1])
        self.min_versions.append(body.get("min_model_version"))
        if path == "/score":
            if not body["candidates"]:
                return httpx.Response(422, json={"detail": "candidates must not be empty"})
            return httpx.Response(200, json={"scores": [self._score(body["prompt"], c) for c in body["candidates"]],
                                             "model_version": self.version})
        if path == "/generate":
            assert body["parameters"]["do_sample"] is False
            return httpx.Response(200, json={"generated_text": " and so on", "model_version": self.version})
        if path == "/info":
            return httpx.Response(200, json={"model": "fake-model", "model_version": self.version})
        return httpx.Response(404)

    def _submit(self, body: dict) -> httpx.Response:
        created = []
        for edit in body["edits"]:
            self.bodies.append(edit)
            edit_id = f"e{len(self.edits)}"
            self.edits[edit_id] = {"id": edit_id, "status": "queued", "request": edit}
            created.append({"id": edit_id, "status": "queued", "queue_position": len(self.edits)})
        return httpx.Response(202, json={"edits": created})

    def _poll(self, edit_id: str) -> httpx.Response:
        record = self.edits[edit_id]
        self.polls[edit_id] = self.polls.get(edit_id, 0) + 1
        if record["status"] == "queued":
            record["status"] = "applying"
        elif record["status"] == "applying":
            self.version += 1
            failing = record["request"]["target_new"] == "FAIL"
            record.update(status="failed" if failing else "applied", model_version=self.version,
                          error="update norm too large" if failing else None)
        return httpx.Response(200, json=record)

    def _score(self, prompt: str, candidate: str) -> dict:
        learned = any(e["status"] == "applied" and e["request"]["subject"] in prompt
                      and e["request"]["target_new"] == candidate for e in self.edits.values())
        tokens = len(candidate.split())
        total = (-0.1 if learned else -2.0) * tokens
        return {"candidate": candidate, "total_logprob": total, "mean_logprob": total / tokens, "tokens": tokens}


def _backend(service: FakeService, key: str = "secret") -> HttpBackend:
    return HttpBackend("http://knowpatch.test", key, method="alphaedit", poll_interval_s=0.0,
                       transport=httpx.MockTransport(service))


def test_protocol_over_http_edits_in_batches_and_reads_its_own_writes():
    service = FakeService()
    inputs = EvalInputs(load_cases("counterfact", n=4).cases, load_knowns(count=3), load_heldout(chunks=2))
    results = run_protocol(_backend(service), inputs, ProtocolSettings("counterfact", batch_size=2), progress=False)
    assert results["baseline"]["efficacy"] == 0.0 and results["final"]["efficacy"] == 100.0
    assert results["final"]["efficacy_top1"] is None and results["final"]["control_top1"] is None  # no argmax over HTTP
    assert results["final"]["perplexity"] > 1 and results["final"]["fluency"] > 0
    assert [b["model_version"] for b in results["batches"]] == [2, 4]
    assert service.min_versions[0] is None and service.min_versions[-1] == 4  # reads wait for the last batch
    assert service.bodies[0]["method"] == "alphaedit" and "rephrase_prompts" not in service.bodies[0]
    assert service.bodies[0]["metadata"]["batch"] == "eval-00000"


def test_a_failed_edit_is_reported_with_its_reason():
    service = FakeService()
    case = load_cases("counterfact", n=1).cases[0]
    failing = EditRequest(case.subject, case.prompt, "FAIL", case.target_true)
    outcome = _backend(service).apply([case.request(), failing], "b0")
    assert not outcome.applied and "update norm too large" in outcome.error


def test_score_groups_candidates_per_prompt():
    service = FakeService()
    backend = _backend(service)
    scores = backend.score([Query("p", "a b"), Query("q", "c"), Query("p", "d"), Query("p", "a b")])
    assert [s.tokens for s in scores] == [2, 1, 1, 2] and all(s.top1 is None for s in scores)
    assert len(service.min_versions) == 2  # one call per distinct prompt


def test_http_errors_map_to_the_project_errors():
    with pytest.raises(Unauthorized, match="401"):
        _backend(FakeService(), key="wrong").generate(["x"], 5)
    with pytest.raises(InvalidRequest, match="422"):
        _backend(FakeService())._score_prompt(("p", []))
