"""`knowpatch serve`: API and worker in one process, SQLite ledger, no Redis, SmolLM2."""
from __future__ import annotations

import time

import httpx
import pytest

from .conftest import STARTUP_S, Process, free_port
from .scenario import eiffel_round_trip

pytestmark = pytest.mark.slow


def test_embedded_round_trip(base_env, processes, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = Process(["serve", "--port", str(port)], base_env, tmp_path / "serve.log")
    processes.append(serve.start(f"{url}/ready"))
    with httpx.Client(base_url=url, timeout=60) as client:
        eiffel_round_trip(client)
        info = client.get("/info").json()
        assert info["details"]["null_space_dims"] and info["ledger_head"]["seq"] >= 2
    assert (tmp_path / "data" / "ledger.db").is_file()


def test_serve_listens_while_the_model_loads(base_env, processes, tmp_path):
    """/health answers at once; /ready is 503 with the start's phase (JSON) until the model is loaded and
    the ledger replayed, then 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = Process(["serve", "--port", str(port)], base_env, tmp_path / "serve.log")
    processes.append(serve.start(f"{url}/health"))
    seen: list[dict] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            ready = client.get("/ready")
            if ready.status_code == 200:
                break
            assert ready.status_code == 503 and client.get("/health").status_code == 200
            seen.append(ready.json())
            time.sleep(0.2)
        assert ready.status_code == 200, serve.tail()
    assert seen, "/ready was never 503: the server only listened once ready"
    phases = {body["progress"]["phase"] for body in seen if body.get("progress")}
    assert phases, seen[:3]
    assert all(body["checks"]["backend"].startswith("starting: ") for body in seen if body.get("progress"))
