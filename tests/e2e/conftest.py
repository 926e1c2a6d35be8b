"""Real processes: `knowpatch serve`, or `knowpatch api` + `knowpatch worker`, driven over HTTP."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_CACHE, shared_data

STARTUP_S = 600  # first start converts the model and computes statistics; later starts take seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """One knowpatch command as a subprocess, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen | None = None

    def start(self, health_url: str, timeout_s: float = STARTUP_S) -> "Process":
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "knowpatch", *self.args], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(health_url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.args} not healthy after {timeout_s} s:\n{self.tail()}")

    def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def service_env(data_dir: Path) -> dict[str, str]:
    """The environment of a knowpatch process under test: no inherited KNOWPATCH_ settings, the tests'
    cache. Skips the test where the shared WikiText-2 file is missing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOWPATCH_")}
    env.update({
        "KNOWPATCH_DATA_DIR": str(data_dir),
        "KNOWPATCH_CACHE_DIR": str(TEST_CACHE),
        # the WikiText-2 file of ../shared/data keeps the statistics pass short in tests
        "KNOWPATCH_CORPUS": str(shared_data("wikitext")),
        "KNOWPATCH_STATS_TOKENS": "20000",
        "KNOWPATCH_VERSION_WAIT_S": "120",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    return service_env(tmp_path / "data")


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


@pytest.fixture
def stream_name(redis_url: str) -> Iterator[str]:
    import redis

    name = f"knowpatch-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name)
    client.close()
