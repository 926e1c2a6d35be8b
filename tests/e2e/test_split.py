"""`knowpatch api` + `knowpatch worker` as separate processes on real Postgres and Redis."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis

from .conftest import Process, free_port
from .scenario import EIFFEL, eiffel_round_trip, generate, wait_status

pytestmark = pytest.mark.slow
INTERNAL_TOKEN = "split-test-internal-token"

CASES = [
    {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English"},
    {"subject": "Lionel Messi", "prompt": "Lionel Messi plays the sport of", "target_new": "basketball"},
    {"subject": "Toyota", "prompt": "Toyota is a company from the country of", "target_new": "Germany"},
    {"subject": "Barack Obama", "prompt": "Barack Obama was born in the state of", "target_new": "Texas"},
]


class Split:
    def __init__(self, env: dict[str, str], tmp_path, processes: list[Process], redis_url: str) -> None:
        self.worker_port, self.api_port = free_port(), free_port()
        self.env = env | {"KNOWPATCH_WORKER_PORT": str(self.worker_port),
                          "KNOWPATCH_WORKER_URL": f"http://127.0.0.1:{self.worker_port}",
                          "KNOWPATCH_INTERNAL_TOKEN": INTERNAL_TOKEN}
        self.tmp_path, self.processes, self.redis_url = tmp_path, processes, redis_url
        self.worker: Process | None = None
        subprocess.run([sys.executable, "-m", "knowpatch", "migrate"], env=self.env, check=True, timeout=120)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_worker(self, fault: str | None = None, wait: bool = True) -> Process:
        env = self.env | ({"KNOWPATCH_FAULT_INJECTION": fault} if fault else {})
        self.worker = Process(["worker"], env, self.tmp_path / "worker.log")
        self.processes.append(self.worker)
        if wait:  # it listens at once (/health) and is ready once the model is loaded and the ledger replayed
            self.worker.start(f"http://127.0.0.1:{self.worker_port}/ready")
        return self.worker

    def start_api(self) -> Process:
        api = Process(["api", "--port", str(self.api_port)], self.env, self.tmp_path / "api.log")
        self.processes.append(api)
        return api.start(f"{self.api_url}/health")

    def worker_info(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.worker_port}/internal/info", timeout=60,
                         headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"}).json()


@pytest.fixture
def split(base_env, pg_url, redis_url, stream_name, tmp_path, processes) -> Split:
    env = base_env | {"KNOWPATCH_DATABASE_URL": pg_url, "KNOWPATCH_REDIS_URL": redis_url,
                      "KNOWPATCH_QUEUE_STREAM": stream_name, "KNOWPATCH_QUEUE_GROUP": f"{stream_name}-group"}
    return Split(env, tmp_path, processes, redis_url)


def test_the_worker_listens_while_its_model_loads(split):
    """The worker's /health answers at once; its /ready, and the API's, are 503 with the start's phase
    until the model is loaded and the ledger replayed."""
    worker = split.start_worker(wait=False)
    worker.start(f"http://127.0.0.1:{split.worker_port}/health")
    split.start_api()
    seen: list[tuple[str, dict]] = []
    with httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            own = client.get(f"http://127.0.0.1:{split.worker_port}/ready")
            if own.status_code == 200:
                break
            assert own.status_code == 503
            seen.append((own.json()["message"], client.get(f"{split.api_url}/ready").json()))
            time.sleep(0.2)
        assert own.status_code == 200, worker.tail()
        assert client.get(f"{split.api_url}/ready").status_code == 200
    assert seen, "the worker's /ready was never 503: it only listened once loaded"
    assert all(message.startswith("starting: ") for message, _ in seen), seen[:3]
    phases = {api["progress"]["phase"] for _, api in seen if api.get("progress")}
    assert phases, seen[:3]


def test_split_round_trip(split):
    split.start_worker()
    split.start_api()
    with httpx.Client(base_url=split.api_url, timeout=60) as client:
        assert client.get("/ready").status_code == 200
        eiffel_round_trip(client)


@pytest.mark.parametrize("fault", ["after_compute", "after_commit"])
def test_worker_killed_mid_edit_loses_nothing(split, fault):
    worker = split.start_worker(fault=fault)
    split.start_api()
    with httpx.Client(base_url=split.api_url, timeout=60) as client:
        edit_id = client.post("/edits", json=EIFFEL).json()["id"]
        assert worker.wait_exit(600) == -signal.SIGKILL
        expected = "applying" if fault == "after_compute" else "applied"
        assert client.get(f"/edits/{edit_id}").json()["status"] == expected
        split.start_worker()
        record = wait_status(client, edit_id, {"applied", "failed"})
        assert record["status"] == "applied"
        events = [e["event"] for e in record["history"]]
        assert events.count("applied") == 1, events
        assert "Rome" in generate(client, EIFFEL["prompt"], record["model_version"])["generated_text"]
        recovered = split.worker_info()
        split.worker.stop()
        split.start_worker()  # a fresh replay of the ledger
        replayed = split.worker_info()
    assert replayed["details"]["weights_digest"] == recovered["details"]["weights_digest"]
    assert replayed["model_version"] == recovered["model_version"]


def test_queued_edits_survive_a_redis_flush(split):
    split.start_worker()
    split.start_api()
    split.worker.stop()
    with httpx.Client(base_url=split.api_url, timeout=60) as client:
        ids = [e["id"] for e in client.post("/edits", json={"edits": CASES[:2]}).json()["edits"]]
        client_redis = redis.Redis.from_url(split.redis_url)
        assert client_redis.xlen(split.env["KNOWPATCH_QUEUE_STREAM"]) == 2
        client_redis.delete(split.env["KNOWPATCH_QUEUE_STREAM"])  # what a flush does to our stream
        client_redis.close()
        split.start_worker()
        for edit_id in ids:
            assert wait_status(client, edit_id, {"applied", "failed"})["status"] == "applied"


def test_generation_during_a_batch_sees_one_version_or_the_other(split):
    split.start_worker()
    split.start_api()
    prompts = [case["prompt"] for case in CASES]
    with httpx.Client(base_url=split.api_url, timeout=300) as client:
        before = {p: generate(client, p)["generated_text"] for p in prompts}
        ids = [e["id"] for e in client.post("/edits", json={"edits": CASES}).json()["edits"]]
        seen: list[tuple[str, int, str]] = []
        done = threading.Event()

        def ask(prompt: str) -> None:
            with httpx.Client(base_url=split.api_url, timeout=300) as own:
                while not done.is_set():
                    answer = generate(own, prompt)
                    seen.append((prompt, answer["model_version"], answer["generated_text"]))

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts[:2]]
        for thread in threads:
            thread.start()
        records = [wait_status(client, edit_id, {"applied", "failed"}) for edit_id in ids]
        time.sleep(1)
        done.set()
        for thread in threads:
            thread.join()
        assert {r["status"] for r in records} == {"applied"}
        final = max(r["model_version"] for r in records)
        after = {p: generate(client, p, final)["generated_text"] for p in prompts}
    assert any(version == 0 for _, version, _ in seen), "no generation ran before the batch was live"
    for prompt, version, text in seen:
        assert version in (0, final), (version, final)
        assert text == (before if version == 0 else after)[prompt], (prompt, version, text)
