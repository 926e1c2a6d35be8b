"""The ledger page (/ui) and the API docs in a real headless browser: Debian's chromium driven by
playwright, against the real API over HTTP. The embedded deployment's parts run in this process: a
SQLite ledger, a LocalQueue, a Worker applying edits (AlphaEdit) on a tiny random Llama with the
SmolLM2 tokenizer, and the LocalBackend serving generation from the same editor. Nothing of knowpatch
is mocked.

The tests skip, saying how to install it, when chromium (`apt-get install chromium`; or set
KNOWPATCH_CHROMIUM to a Chromium binary) or the playwright package (`pip install -e '.[test]'`) is
missing; playwright's own browser download is not used. Every page's requests to anything but the
test server are refused and fail the test: the pages must work offline. Screenshots are kept in
KNOWPATCH_TEST_ARTIFACTS (default .cache/tests/artifacts in the repository)."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from service.engine.editor import Editor
from service.engine.types import HyperParams
from service.ledger.db import make_engine, migrate, session_factory
from service.model.loading import load_model
from service.queue import LocalQueue
from tests.api.conftest import KEYS, Api, ApiRunner
from tests.conftest import REPO
from tests.engine.conftest import CACHE_DIR, tiny_model, wikitext_moments
from workers.inference import LocalBackend
from workers.worker import Worker

ARTIFACTS = Path(os.environ.get("KNOWPATCH_TEST_ARTIFACTS") or REPO / ".cache" / "tests" / "artifacts") / "ui"
INSTALL_HINT = "install it with `apt-get install chromium` (Debian/Ubuntu), or set KNOWPATCH_CHROMIUM to a Chromium binary"
HP = HyperParams(layers=(1, 2, 3), v_num_grad_steps=5, stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)
WAIT_S = 30.0  # longest wait for the worker or the page (a busy 2-core machine is slow)


def chromium_binary() -> str:
    """The system Chromium's path; skips the test, saying how to install it, when there is none."""
    configured = os.environ.get("KNOWPATCH_CHROMIUM")
    found = configured if configured and Path(configured).is_file() else None
    found = found or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip(f"the UI tests need a Chromium browser and found none: {INSTALL_HINT}")
    return found


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """One headless Chromium for these tests, driven by playwright. Package scope, not session: the
    sync API runs an event loop in this thread while it lives, and asyncio.run() in later tests
    (tests/workers) refuses to start beside it."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("the UI tests need the playwright package: `pip install -e '.[test]'` "
                    f"(its browser download is not needed), and Chromium: {INSTALL_HINT}")
    executable = chromium_binary()
    expect.set_options(timeout=WAIT_S * 1000)  # assertions wait as long as actions (5 s by default)
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


@dataclass
class PageWatch:
    """What a page did that a test must not allow: a request off this machine, a script error, a
    Content-Security-Policy violation."""

    origin: str
    tolerated: tuple[str, ...] = ()  # external URLs refused without failing the test
    external: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(self.origin) or url.startswith("data:") or url.startswith("blob:"):
            route.continue_()
        else:
            if url not in self.tolerated:
                self.external.append(url)
            route.abort()

    def console(self, message: Any) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)


def _artifact_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


@pytest.fixture
def open_page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """open_page(url, tolerated=()) -> a playwright Page at `url` in a fresh context (its own
    sessionStorage), watched by PageWatch; a test that fails leaves <test>-failed-<n>.png."""
    opened: list[tuple[Any, PageWatch]] = []

    def open_(url: str, tolerated: tuple[str, ...] = ()) -> Any:
        context = browser.new_context(viewport={"width": 1500, "height": 1000})
        context.set_default_timeout(WAIT_S * 1000)
        page = context.new_page()
        watch = PageWatch(origin=re.match(r"https?://[^/]+", url).group(0), tolerated=tolerated)  # type: ignore[union-attr]
        page.route("**/*", watch.route)
        page.on("console", watch.console)
        page.on("pageerror", lambda exc: watch.errors.append(f"script error: {exc}"))
        page.goto(url)
        opened.append((page, watch))
        return page

    yield open_
    report = getattr(request.node, "call_report", None)
    for n, (page, watch) in enumerate(opened):
        if report is not None and report.failed:  # what the page showed when the test failed
            screenshot(page, f"{request.node.name}-failed-{n}")
        page.context.close()
        assert not watch.external, f"the page asked for resources off this machine: {watch.external}"
        assert not watch.errors, f"the page reported errors: {watch.errors}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keeps the test's own outcome on it, for open_page's teardown."""
    outcome = yield
    if call.when == "call":
        item.call_report = outcome.get_result()  # type: ignore[attr-defined]


def screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    """Keep what the page shows as ARTIFACTS/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{_artifact_name(name)}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def use_key(page: Any, name: str) -> None:
    """Type the test key `name` into the page, as an operator does."""
    page.fill("#api-key", KEYS[name])
    page.click("#key-form button[type=submit]")


@pytest.fixture(scope="package")
def editor() -> Iterator[Editor]:
    """A real Editor (AlphaEdit, 5 target steps, layers 1-3) on a tiny random Llama. Each Stack's
    Worker replays its own empty ledger at start, which resets it to the base weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a thread pool only spins on a busy machine
    tokenizer = load_model("smollm2", cache_dir=CACHE_DIR).tokenizer
    loaded = tiny_model("llama", tokenizer)
    built = Editor(loaded, HP, wikitext_moments(loaded, HP), templates=["{}"], keep_factors=False)
    yield built
    built.close()
    torch.set_num_threads(threads)


@dataclass
class Stack:
    """The API over HTTP with a worker applying its edits, on a fresh ledger."""

    api: Api
    worker: Worker
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def run_worker(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.worker.run, args=(self._stop,), kwargs={"poll_s": 0.2},
                                        name="ui-test-worker", daemon=True)
        self._thread.start()

    def stop_worker(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WAIT_S)
            assert not self._thread.is_alive(), "the worker did not stop"
            self._thread = None

    @contextmanager
    def worker_paused(self) -> Iterator[None]:
        """Edits submitted meanwhile stay queued."""
        self.stop_worker()
        try:
            yield
        finally:
            self.run_worker()

    def submit(self, subject: str, key: str = "alice", **fields: Any) -> str:
        body = {"subject": subject, "prompt": f"{subject} is located in the city of", "target_new": "Rome",
                "target_true": "Paris", **fields}
        reply = self.api.as_(key).post("/edits", json=body)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def record(self, edit_id: str) -> dict[str, Any]:
        reply = self.api.as_("root").get(f"/edits/{edit_id}")
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def wait_for(self, edit_id: str, status: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while (record := self.record(edit_id))["status"] != status:
            assert record["status"] not in ("failed", "cancelled"), record
            assert time.monotonic() < deadline, f"edit {edit_id} still {record['status']}, not {status}"
            time.sleep(0.1)
        return record


@pytest.fixture
def stack(editor: Editor, tmp_path: Path) -> Iterator[Stack]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    engine = make_engine(url)
    queue = LocalQueue()
    worker = Worker(editor, session_factory(engine), queue, batch_size=4)
    worker.start()
    runner = ApiRunner(url)
    backend = LocalBackend(editor, version_wait_s=WAIT_S, not_ready=worker.not_ready)
    built = Stack(runner.start(queue=queue, backend=backend), worker)
    built.run_worker()
    yield built
    built.stop_worker()
    runner.close()
    backend.close()  # its decoding thread
    engine.dispose()


@pytest.fixture
def api_runner(tmp_path: Path) -> Iterator[ApiRunner]:
    """Starts the API alone (no worker, no backend) on a fresh SQLite ledger: start(**settings),
    with the test keys unless api_keys is given."""
    runner = ApiRunner(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield runner
    runner.close()
