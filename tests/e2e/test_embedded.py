"""`knowpatch serve`: API and worker in one process, SQLite ledger, no Redis, SmolLM2."""
from __future__ import annotations

import httpx
import pytest

from .conftest import Process, free_port
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
