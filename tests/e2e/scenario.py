"""The Eiffel Tower scenario over HTTP, shared by the embedded and the split deployment tests."""
from __future__ import annotations

import time

import httpx

EIFFEL = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
    "target_true": "Paris",
    "rephrase_prompts": ["The Eiffel Tower can be found in the city of"],
}


def wait_status(client: httpx.Client, edit_id: str, wanted: set[str], timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = client.get(f"/edits/{edit_id}").json()
        if record["status"] in wanted:
            return record
        time.sleep(0.5)
    raise AssertionError(f"edit {edit_id} still {record['status']} after {timeout_s} s")


def generate(client: httpx.Client, text: str, min_version: int | None = None) -> dict:
    body = {"inputs": text, "parameters": {"max_new_tokens": 6, "do_sample": False}}
    if min_version is not None:
        body["min_model_version"] = min_version
    response = client.post("/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def eiffel_round_trip(client: httpx.Client) -> None:
    """Edit to Rome, check generate/score, roll back, check Paris again, check the audit trail."""
    assert "Paris" in generate(client, EIFFEL["prompt"])["generated_text"]
    posted = client.post("/edits", json=EIFFEL)
    assert posted.status_code == 202, posted.text
    edit_id = posted.json()["id"]
    assert posted.headers["location"] == f"/edits/{edit_id}"
    record = wait_status(client, edit_id, {"applied", "failed"})
    assert record["status"] == "applied", record
    version = record["model_version"]
    answer = generate(client, EIFFEL["prompt"], min_version=version)
    assert "Rome" in answer["generated_text"] and answer["model_version"] >= version
    scores = client.post("/score", json={"prompt": EIFFEL["prompt"], "candidates": ["Rome", "Paris"],
                                        "min_model_version": version}).json()
    by_name = {s["candidate"]: s["mean_logprob"] for s in scores["scores"]}
    assert by_name["Rome"] > by_name["Paris"], scores
    rollback = client.post(f"/edits/{edit_id}/rollback", json={"reason": "test: undo the Rome edit"})
    assert rollback.status_code == 202, rollback.text
    record = wait_status(client, edit_id, {"rolled_back"})
    after = generate(client, EIFFEL["prompt"], min_version=record["model_version"] + 1)
    assert "Paris" in after["generated_text"], after
    events = [e["event"] for e in client.get(f"/edits/{edit_id}").json()["history"]]
    assert events == ["queued", "applying", "applied", "rollback_requested", "rolled_back"], events
