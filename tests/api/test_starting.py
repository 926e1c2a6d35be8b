"""An API whose backend is still starting: /health 200, /ready 503 with the phase and its progress,
model routes 503; then normal once the backend is set."""
from __future__ import annotations

from service.progress import Progress
from service.starting import StartingBackend
from tests.api.conftest import ApiRunner, auth
from workers.inference import LocalBackend


def test_ready_reports_the_start_then_serves(module_runner: ApiRunner, local_backend: LocalBackend) -> None:
    tracker = Progress()
    holder = StartingBackend("tiny-llama", tracker)
    api = module_runner.start(backend=holder)
    client = api.as_(None)
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503
    tracker.phase("key statistics", 1000, "tokens")
    tracker.advance(100)
    ready = client.get("/ready")
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["checks"]["backend"].startswith("starting: key statistics: 100/1000 tokens")
    assert body["progress"]["phase"] == "key statistics" and body["progress"]["done"] == 100
    assert body["progress"]["total"] == 1000 and "eta_s" in body["progress"]
    generate = client.post("/generate", json={"inputs": "Hello"}, headers=auth("alice"))
    assert generate.status_code == 503 and generate.json()["error"]["type"] == "Unavailable"
    assert "key statistics" in generate.json()["error"]["message"]

    holder.ready(local_backend)
    ready = client.get("/ready")
    assert ready.status_code == 200 and "progress" not in ready.json()
    reply = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, headers=auth("alice"))
    assert reply.status_code == 200, reply.text
