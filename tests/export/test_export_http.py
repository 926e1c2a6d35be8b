"""GET /admin/export over real HTTP, in both deployments: the API over the in-process backend on a
SQLite ledger (embedded), and the API over the worker's internal server on Postgres (split). The
ledger is written by the real worker on the tiny random Llama; the tar must unpack to the folder that
`knowpatch export` writes at the version served (the same files, the merged weights giving the
service's logits bit for bit, the adapter within 1e-4 through peft), and its temporary folder must be
gone afterwards, also when the client leaves mid-stream."""
from __future__ import annotations

import io
import json
import socket
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoModelForCausalLM

from api.backend_http import HttpBackend
from service.engine.editor import Editor
from service.export import INFO_FILE, export_merged, export_peft, export_served, ledger_state, replay
from service.ledger.db import make_engine, migrate, session_factory
from service.model.loading import load_model
from service.progress import Progress
from service.queue.local import LocalQueue
from service.starting import StartingBackend
from tests.api.conftest import INTERNAL_TOKEN, Api, ApiRunner, auth, serve
from tests.conftest import fresh_postgres, submit_edits
from tests.engine.conftest import CACHE_DIR, tiny_model, wikitext_moments
from tests.export.test_export import HP, PEFT_TOLERANCE, _load_adapter, _logits, _max_diff, requires_peft
from workers.inference import LocalBackend
from workers.server import create_worker_app
from workers.worker import Worker

DOWNLOAD_TIMEOUT_S = 120  # the tiny model's export takes a second or two; the CI machine is busy
# A receive window of a few KB (setting SO_RCVBUF also stops the kernel growing it): the tiny model's
# 25 MB tar no longer fits in the sockets' buffers, so a slow reader really holds the sender mid-stream.
SMALL_WINDOW = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]


@dataclass
class Deployment:
    name: str
    url: str  # the ledger's
    sessions: sessionmaker[Session]
    tokenizer: Any
    moments: dict
    worker: Worker  # the live worker: tests apply edits with it, and its editor is what the API serves
    backend: LocalBackend  # over the worker's editor, with the ledger
    export_dir: Path  # where the model side writes exports before streaming them
    runner: ApiRunner
    api: Api | None = None
    worker_url: str | None = None  # the internal server (split only)
    served: dict[int, tuple[str, list[torch.Tensor]]] = field(default_factory=dict)  # version -> digest, logits

    def drain(self) -> int:
        """Apply every queued edit; record the served digest and logits; the version now served."""
        while self.worker.process_next():
            pass
        editor = self.worker.editor
        self.served[editor.version] = (editor.weights_digest(), _logits(editor.model, self.tokenizer))
        return editor.version

    def fresh_editor(self) -> Editor:
        return Editor(tiny_model("llama", self.tokenizer), HP, self.moments, templates=["{}"], keep_factors=False)

    def cli_export(self, export_format: str, version: int, out: Path, rank: int | None = None) -> dict[str, Any]:
        """What `knowpatch export --version V` writes: a fresh editor replaying the ledger at V."""
        editor = self.fresh_editor()
        with self.sessions() as session:
            state = ledger_state(session, editor.layers, version)
        replay(editor, state)
        if export_format == "merged":
            return export_merged(editor, state, out)
        return export_peft(editor, state, out, rank=rank)

    def start_api(self, backend: LocalBackend | StartingBackend, stack: ExitStack, small_window: bool = False) -> Api:
        """The API over `backend`: in process (embedded), or through its worker server (split), the
        API reading from the worker with SMALL_WINDOW if `small_window`."""
        if self.name == "embedded":
            return self.runner.start(self.url, backend=backend)
        assert isinstance(backend, LocalBackend)
        worker_url = stack.enter_context(serve(create_worker_app(backend, token=INTERNAL_TOKEN,
                                                                 max_new_tokens_limit=512)))
        self.worker_url = self.worker_url or worker_url
        transport = httpx.AsyncHTTPTransport(socket_options=SMALL_WINDOW) if small_window else None
        http = HttpBackend(worker_url, timeout=DOWNLOAD_TIMEOUT_S, token=INTERNAL_TOKEN, transport=transport)
        return self.runner.start(self.url, backend=http, lifespan_hooks=[http.lifespan])


@pytest.fixture(scope="module", params=["embedded", "split"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Two edits applied by the real worker (version 2), served by a LocalBackend that exports into
    its own folder; embedded on SQLite, split on Postgres, as the two deployments run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ExitStack() as stack:
        split = request.param == "split"
        url = stack.enter_context(fresh_postgres()) if split else \
            f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
        migrate(url)
        engine = make_engine(url)
        stack.callback(engine.dispose)
        sessions = session_factory(engine)
        tokenizer = load_model("smollm2", cache_dir=CACHE_DIR).tokenizer
        moments = wikitext_moments(tiny_model("llama", tokenizer), HP)
        editor = Editor(tiny_model("llama", tokenizer), HP, moments, templates=["{}"], keep_factors=False)
        backend = LocalBackend(editor, ledger=sessions, export_dir=tmp_path_factory.mktemp("exports"))
        stack.callback(backend.close)
        runner = ApiRunner(url)
        stack.callback(runner.close)
        found = Deployment(request.param, url, sessions, tokenizer, moments,
                           Worker(editor, sessions, LocalQueue(), batch_size=2), backend, backend.exports.tmp_dir,
                           runner)
        found.api = found.start_api(backend, stack)
        submit_edits(sessions, ["Eiffel Tower", "Big Ben"])
        assert found.drain() == 2
        yield found
    torch.set_num_threads(threads)


def api_of(deployment: Deployment) -> Api:
    assert deployment.api is not None
    return deployment.api


def download(api: Api, key: str | None = "root", **params: Any) -> httpx.Response:
    return httpx.get(f"{api.url}/admin/export", params=params, headers=auth(key) if key else {},
                     timeout=DOWNLOAD_TIMEOUT_S)


def unpack(body: bytes, into: Path) -> Path:
    """The tar's one top-level folder, extracted under `into`."""
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
        tar.extractall(into, filter="data")
    top = names[0]
    assert all(name == top or name.startswith(f"{top}/") for name in names), names
    return into / top


def assert_same_folder(exported: Path, cli: Path) -> None:
    """The same files, byte for byte, but for the export time in export_info.json."""
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in cli.iterdir())
    for path in cli.iterdir():
        if path.name == INFO_FILE:
            ours, theirs = (json.loads((folder / INFO_FILE).read_text()) for folder in (exported, cli))
            assert {**ours, "exported_at": None} == {**theirs, "exported_at": None}
        else:
            assert (exported / path.name).read_bytes() == path.read_bytes(), path.name


def wait_until(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def no_export_left(deployment: Deployment) -> bool:
    return not any(deployment.export_dir.iterdir())


def test_the_merged_export_is_the_cli_folder_with_the_service_logits(deployment: Deployment, tmp_path: Path) -> None:
    reply = download(api_of(deployment), format="merged")
    assert reply.status_code == 200, reply.text
    version = int(reply.headers["X-Model-Version"])
    assert reply.headers["content-type"] == "application/x-tar"
    assert reply.headers["content-disposition"] == f'attachment; filename="knowpatch-merged-v{version}.tar"'
    assert int(reply.headers["content-length"]) == len(reply.content)
    folder = unpack(reply.content, tmp_path / "http")
    assert folder.name == f"knowpatch-merged-v{version}"
    deployment.cli_export("merged", version, tmp_path / "cli")
    assert_same_folder(folder, tmp_path / "cli")

    digest, served = deployment.served[version]
    info = json.loads((folder / INFO_FILE).read_text())
    assert (info["ledger_head_seq"], info["weights_digest"]) == (version, digest)
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert all(torch.equal(x, y) for x, y in zip(_logits(exported, deployment.tokenizer), served))
    wait_until(lambda: no_export_left(deployment))


@requires_peft
@pytest.mark.parametrize("rank", [None, 1])
def test_the_peft_export_is_the_cli_adapter_and_loads_with_peft(deployment: Deployment, tmp_path: Path,
                                                                rank: int | None) -> None:
    reply = download(api_of(deployment), format="peft", **({"rank": rank} if rank else {}))
    assert reply.status_code == 200, reply.text
    version = int(reply.headers["X-Model-Version"])
    assert reply.headers["content-disposition"] == f'attachment; filename="knowpatch-peft-v{version}.tar"'
    folder = unpack(reply.content, tmp_path / "http")
    info = deployment.cli_export("peft", version, tmp_path / "cli", rank=rank)
    assert_same_folder(folder, tmp_path / "cli")
    assert info["lora"]["exact"] is (rank is None) and info["lora"]["requested_rank"] == rank

    adapted = _load_adapter(tiny_model("llama", deployment.tokenizer).model, folder)
    if rank is None:  # a truncated adapter is not the service's model (test_export checks its error)
        diff = _max_diff(_logits(adapted, deployment.tokenizer), deployment.served[version][1])
        assert diff <= PEFT_TOLERANCE, diff
    wait_until(lambda: no_export_left(deployment))


@pytest.mark.parametrize(("key", "status"), [("gen", 403), ("alice", 403), (None, 401)])
def test_the_export_needs_the_admin_scope(deployment: Deployment, key: str | None, status: int) -> None:
    reply = download(api_of(deployment), key, format="merged")
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["type"] == ("Forbidden" if status == 403 else "Unauthorized")
    if status == 403:
        assert "edits:admin" in reply.json()["error"]["message"]


@pytest.mark.parametrize(("params", "message"), [
    ({"format": "gguf"}, "format"),
    ({"format": "peft", "rank": 0}, "rank"),
    ({"format": "peft", "rank": "high"}, "rank"),
    ({"format": "merged", "rank": 2}, "rank applies to format=peft only"),
])
def test_a_bad_request_is_refused_before_any_work(deployment: Deployment, params: dict[str, Any], message: str) -> None:
    reply = download(api_of(deployment), **params)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["type"] == "InvalidRequest" and message in reply.json()["error"]["message"]
    if deployment.worker_url is not None:  # the worker refuses it too, in the same words where it can
        internal = httpx.get(f"{deployment.worker_url}/internal/export", params=params,
                             headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"}, timeout=30)
        assert internal.status_code == 422 and message in internal.json()["error"]["message"]
    assert no_export_left(deployment)


def test_the_internal_export_needs_the_token(deployment: Deployment) -> None:
    if deployment.worker_url is None:
        pytest.skip("the embedded deployment has no internal server")
    reply = httpx.get(f"{deployment.worker_url}/internal/export", params={"format": "merged"}, timeout=30)
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "Unauthorized"


def test_one_export_at_a_time_and_its_folder_goes_when_the_client_does(deployment: Deployment) -> None:
    """A reader that stalls mid-stream holds the export (another gets 429); when it goes away, the
    model's side deletes the folder (through the API and the worker, in the split deployment)."""
    with ExitStack() as stack:
        api = deployment.start_api(deployment.backend, stack, small_window=True)
        client = stack.enter_context(httpx.Client(base_url=api.url, headers=auth("root"), timeout=DOWNLOAD_TIMEOUT_S,
                                                  transport=httpx.HTTPTransport(socket_options=SMALL_WINDOW)))
        with client.stream("GET", "/admin/export", params={"format": "merged"}) as reply:
            assert reply.status_code == 200
            chunks = reply.iter_raw()  # held: a discarded iterator closes the connection at once
            next(chunks)
            time.sleep(0.5)
            assert not no_export_left(deployment)  # still streaming: the small windows hold the sender back
            busy = download(api, format="peft")
            assert busy.status_code == 429, busy.text
            assert busy.json()["error"]["type"] == "Overloaded" and busy.headers["Retry-After"]
        # leaving the block mid-stream closes the connection: the client has gone away
        wait_until(lambda: no_export_left(deployment))
    assert download(api_of(deployment), format="merged").status_code == 200  # the slot is free again
    wait_until(lambda: no_export_left(deployment))


def test_an_export_holds_the_version_served_when_it_started(deployment: Deployment, tmp_path: Path) -> None:
    """An edit applied while the export streams is not in it; the next export has it."""
    before = deployment.worker.editor.version
    with httpx.Client(base_url=api_of(deployment).url, headers=auth("root"), timeout=DOWNLOAD_TIMEOUT_S) as client:
        with client.stream("GET", "/admin/export", params={"format": "merged"}) as reply:
            chunks = reply.iter_bytes()
            first = next(chunks)
            submit_edits(deployment.sessions, [f"Tower {uuid.uuid4().hex[:6]}"])
            after = deployment.drain()
            body = first + b"".join(chunks)
    assert int(reply.headers["X-Model-Version"]) == before < after
    info = json.loads((unpack(body, tmp_path / "before") / INFO_FILE).read_text())
    assert (info["ledger_head_seq"], info["weights_digest"]) == (before, deployment.served[before][0])

    reply = download(api_of(deployment), format="merged")
    info = json.loads((unpack(reply.content, tmp_path / "after") / INFO_FILE).read_text())
    assert (info["ledger_head_seq"], info["weights_digest"]) == (after, deployment.served[after][0])
    wait_until(lambda: no_export_left(deployment))


def test_the_served_version_is_exported_even_behind_the_ledger_head(deployment: Deployment, tmp_path: Path) -> None:
    """A worker that has recorded a batch but not installed it yet still serves (and exports) the one
    before: an editor replayed at an earlier version exports that version, not the head."""
    if deployment.worker.editor.version == 2:
        submit_edits(deployment.sessions, [f"Tower {uuid.uuid4().hex[:6]}"])
        assert deployment.drain() > 2
    editor = deployment.fresh_editor()
    with deployment.sessions() as session:
        replay(editor, ledger_state(session, editor.layers, 2))
    info = export_served(editor, deployment.sessions, "merged", tmp_path / "out")
    assert (info["ledger_head_seq"], info["weights_digest"]) == (2, deployment.served[2][0])


def test_503_while_the_model_is_not_ready(deployment: Deployment) -> None:
    with ExitStack() as stack:
        replaying = LocalBackend(deployment.worker.editor, not_ready=lambda: "replaying the ledger",
                                 ledger=deployment.sessions, export_dir=deployment.export_dir)
        stack.callback(replaying.close)
        backends: list[LocalBackend | StartingBackend] = [replaying]
        if deployment.name == "embedded":  # `knowpatch serve` listens before its model is loaded
            backends.append(StartingBackend("tiny-llama", Progress()))
        for backend in backends:
            reply = download(deployment.start_api(backend, stack), format="merged")
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["type"] == "Unavailable" and reply.headers["Retry-After"]
            assert "not ready" in reply.json()["error"]["message"]
    assert no_export_left(deployment)


def test_the_route_is_documented(deployment: Deployment) -> None:
    if deployment.name != "embedded":
        pytest.skip("one OpenAPI document is enough")
    operation = httpx.get(f"{api_of(deployment).url}/openapi.json").json()["paths"]["/admin/export"]["get"]
    assert "application/x-tar" in operation["responses"]["200"]["content"]
    assert {"401", "403", "422", "429", "503"} <= set(operation["responses"])
    assert "edits:admin" in operation["description"] and "knowpatch export" in operation["description"]

