"""The API over real HTTP: uvicorn in a background thread on a free loopback port, real ledgers
(SQLite and Postgres), real queues and a real model: an Editor on a tiny random Llama with the
SmolLM2 tokenizer, served in process (workers.inference.LocalBackend) or by the worker's internal
server (workers.server) through api.backend_http.HttpBackend."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import LifespanHook, create_app
from service.config import Settings
from service.engine.editor import Editor
from service.engine.types import HyperParams
from service.inference import InferenceBackend
from service.ledger.db import make_engine, migrate, session_factory
from service.ledger.models import Edit, EditEvent, EditFactor, IdempotencyKey, Operation
from service.model.loading import load_model
from service.queue import LocalQueue, OperationQueue
from tests.engine.conftest import CACHE_DIR, tiny_model, wikitext_moments
from workers.inference import LocalBackend
from workers.server import create_worker_app

# alice writes and generates, root administers, gen only generates.
INTERNAL_TOKEN = "internal-token-of-the-tests"
MAX_NEW_TOKENS_LIMIT = 512
API_KEYS = "alice:alice-key:edits:write,generate;root:root-key:edits:admin;gen:gen-key:generate"
KEYS = {"alice": "alice-key", "root": "root-key", "gen": "gen-key"}
# How long the backends wait for a min_model_version before answering 503.
VERSION_WAIT_S = 0.5


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def local_port(reply: httpx.Response) -> int:
    """The client-side port of the connection that carried `reply`. Replies with the same port came
    over one kept-alive connection; an unhandled server error closes it after its 500."""
    return int(reply.extensions["network_stream"].get_extra_info("client_addr")[1])


@dataclass
class Api:
    url: str
    ledger: sessionmaker[Session]
    queue: OperationQueue
    clients: dict[str | None, httpx.Client] = field(default_factory=dict)

    @property
    def client(self) -> httpx.Client:
        """Authenticated as alice (edits:write, generate)."""
        return self.as_("alice")

    def as_(self, name: str | None) -> httpx.Client:
        """A client with key `name`, or with no key (None); kept open until the API stops."""
        if name not in self.clients:
            self.clients[name] = httpx.Client(base_url=self.url, headers=auth(name) if name else {}, timeout=10)
        return self.clients[name]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def counts(self) -> dict[str, int]:
        """Rows per ledger table: compared before/after requests that must change nothing."""
        with self.ledger() as s:
            return {t.__tablename__: int(s.scalar(select(func.count()).select_from(t)) or 0)
                    for t in (Edit, Operation, EditEvent, EditFactor, IdempotencyKey)}


ApiFactory = Callable[..., Api]


class ApiRunner:
    """Starts APIs on migrated ledgers and stops them all at close()."""

    def __init__(self, default_url: str) -> None:
        self.default_url = default_url
        self._closers: list[Callable[[], object]] = []

    def start(self, url: str | None = None, *, queue: OperationQueue | None = None,
              backend: InferenceBackend | None = None, lifespan_hooks: list[LifespanHook] | None = None,
              **settings: Any) -> Api:
        """An API on `url` (default: a SQLite file) with `queue` (default: LocalQueue) and `backend`."""
        url = url or self.default_url
        migrate(url)
        engine = make_engine(url)
        self._closers.append(engine.dispose)
        queue = queue or LocalQueue()
        app = create_app(Settings(**{"api_keys": API_KEYS, **settings}), session_factory=session_factory(engine),
                         queue=queue, backend=backend, lifespan_hooks=lifespan_hooks)
        server = serve(app)
        base = server.__enter__()
        self._closers.append(lambda: server.__exit__(None, None, None))
        api = Api(base, session_factory(engine), queue)
        self._closers.append(api.close)
        return api

    def close(self) -> None:
        for close in reversed(self._closers):
            close()


@pytest.fixture
def make_api(sqlite_url: str) -> Iterator[ApiFactory]:
    """make_api(url=None, *, queue=None, backend=None, **settings) -> Api, stopped after the test."""
    runner = ApiRunner(sqlite_url)
    yield runner.start
    runner.close()


@pytest.fixture(scope="module")
def module_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiRunner]:
    """For tests that only compare the ledger before/after: one server per module is faster."""
    runner = ApiRunner(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}")
    yield runner
    runner.close()


@pytest.fixture
def api(make_api: ApiFactory) -> Api:
    """An API on SQLite with a LocalQueue, API keys configured and no inference backend."""
    return make_api()


@pytest.fixture
def any_ledger_api(make_api: ApiFactory, ledger_url: str) -> Api:
    """The same, on each ledger backend (SQLite and Postgres)."""
    return make_api(ledger_url)


def edit_body(subject: str | None = None, **overrides: Any) -> dict[str, Any]:
    subject = subject or f"Tower {uuid.uuid4().hex[:8]}"
    return {"subject": subject, "prompt": f"{subject} is located in the city of", "target_new": "Rome",
            "target_true": "Paris", **overrides}


@pytest.fixture(scope="package")
def editor() -> Iterator[Editor]:
    """A real Editor (AlphaEdit, layers 1-3) on a tiny random Llama with the SmolLM2 tokenizer, at
    version 0; built once for the API tests. Tests that change its version must set it back.

    Torch runs on one thread meanwhile: the model is tiny, and on a busy machine the thread pool's
    spinning makes each step ~30x slower. Package scope restores it after these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = tiny_model("llama", load_model("smollm2", cache_dir=CACHE_DIR).tokenizer)
    hparams = HyperParams(layers=(1, 2, 3), stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)
    moments = wikitext_moments(loaded, hparams)
    # One context template: these tests never compute an edit, and sampling more costs seconds.
    built = Editor(loaded, hparams, moments, method="alphaedit", templates=["{}"])
    yield built
    built.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def local_backend(editor: Editor) -> LocalBackend:
    """The in-process backend of the embedded deployment, waiting VERSION_WAIT_S for a model version."""
    return LocalBackend(editor, version_wait_s=VERSION_WAIT_S)


@pytest.fixture(scope="package")
def worker_url(local_backend: LocalBackend) -> Iterator[str]:
    """The worker's internal server (split deployment) over `local_backend`, on a loopback port."""
    with serve(create_worker_app(local_backend, token=INTERNAL_TOKEN, max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT)) as url:
        yield url
