"""`knowpatch serve | api | worker | migrate | prepare | export | eval`.

This module is the only place that imports api/ and workers/ together: it builds the objects
(settings, ledger, queue, editor, worker, app) and hands them to each other.
"""
from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from service.config import Settings, internal_token
from service.errors import KnowpatchError
from service.progress import Progress
from service.starting import StartingBackend

log = logging.getLogger("knowpatch")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_exposure(host: str, settings: Settings) -> None:
    from api.auth import auth_enabled

    if auth_enabled(settings):
        return
    if not _is_loopback(host):
        raise SystemExit(
            f"refusing to listen on {host}: no API keys are configured (set KNOWPATCH_API_KEYS), "
            "so the service only listens on loopback"
        )
    log.warning("no API keys configured: every request is allowed; listening on loopback (%s) only", host)


def _check_worker_exposure(settings: Settings) -> None:
    """The internal routes serve the model to anyone with the token: off loopback, only with a
    configured one (a generated token lives in one machine's cache folder)."""
    if settings.internal_token is None and not _is_loopback(settings.worker_host):
        raise SystemExit(f"refusing to serve the worker's internal routes on {settings.worker_host} without "
                         "KNOWPATCH_INTERNAL_TOKEN: set the same secret (16+ characters) on the API and the worker")


def snapshot_path(settings: Settings) -> Path:
    """Where this ledger's factor-store snapshot lives: one file per database URL."""
    key = hashlib.sha256(settings.resolved_database_url().encode()).hexdigest()[:16]
    return settings.cache_dir / "snapshots" / f"factor-store-{key}.pt"


def _start_worker(settings: Settings, sessions, queue, tracker: Progress | None = None):
    from service.bootstrap import build_editor
    from service.engine.gates import gates_from_settings
    from workers.inference import LocalBackend
    from workers.worker import Worker

    tracker = tracker or Progress()
    editor = build_editor(settings, keep_factors=False, tracker=tracker)
    worker = Worker(editor, sessions, queue, batch_size=settings.batch_size, fault_injection=settings.fault_injection,
                    snapshot_path=snapshot_path(settings), gates=gates_from_settings(settings))
    tracker.phase("replaying the ledger")
    worker.start()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="knowpatch-worker", daemon=True)
    thread.start()
    backend = LocalBackend(editor, version_wait_s=settings.version_wait_s, not_ready=worker.not_ready, ledger=sessions)
    return backend, stop, thread


class _BackgroundStart:
    """`_start_worker` in a thread while the API already listens: /ready reports the phase, model routes
    answer 503 through `holder` until it is done. A failed start stops the server (SIGTERM to this process)."""

    def __init__(self, settings: Settings, sessions, queue) -> None:
        self.progress = Progress()
        self.holder = StartingBackend(settings.model, self.progress)
        self.worker: tuple[threading.Event, threading.Thread] | None = None
        self._thread = threading.Thread(target=self._run, args=(settings, sessions, queue),
                                         name="knowpatch-start", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self, settings: Settings, sessions, queue) -> None:
        try:
            backend, stop, thread = _start_worker(settings, sessions, queue, self.progress)
        except BaseException as exc:
            log.exception("the start failed")
            self.holder.fail(exc.message if isinstance(exc, KnowpatchError) else f"{type(exc).__name__}: {exc}")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.worker = (stop, thread)
        self.holder.ready(backend)
        log.info("ready: started in %.1f s", time.monotonic() - self.progress.started)

    def stop(self) -> None:
        if self.worker is not None:
            stop, thread = self.worker
            stop.set()
            thread.join(timeout=60)


def _ledger(settings: Settings, migrate_first: bool):
    from service.ledger.db import make_engine, migrate, session_factory

    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate_first:
        migrate(url)
    return session_factory(make_engine(url))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Everything in one process: SQLite ledger, in-process queue, the model, the API."""
    import uvicorn

    from api.app import create_app
    from service.queue.local import LocalQueue

    _check_exposure(args.host, settings)
    sessions = _ledger(settings, migrate_first=True)
    queue = LocalQueue()
    start = _BackgroundStart(settings, sessions, queue)
    app = create_app(settings, session_factory=sessions, queue=queue, backend=start.holder)
    log.info("knowpatch serving on http://%s:%d (ledger %s); the model loads behind it, /ready reports how far",
             args.host, args.port, settings.resolved_database_url())
    start.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        start.stop()
    return 1 if start.holder.failed is not None else 0


def _redis_queue(settings: Settings):
    from service.queue.redis_streams import RedisStreamQueue

    if not settings.redis_url:
        raise SystemExit("KNOWPATCH_REDIS_URL is required for the split deployment")
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    return RedisStreamQueue(settings.redis_url, settings.queue_stream, settings.queue_group, consumer)


class _KillOnPublish:
    """Testing knob of the API (KNOWPATCH_FAULT_INJECTION=after_ledger_write): the queue's publish comes
    right after the ledger commit of an edit or a rollback (service.edits.publish), so dying here, as a
    SIGKILL would, leaves the operation recorded and never enqueued, and its client with no answer."""

    def __init__(self, queue) -> None:
        self._queue = queue

    def publish(self, seq: int) -> None:
        log.error("fault injection: killing the API after the ledger write of operation %d, before its enqueue", seq)
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name: str):
        return getattr(self._queue, name)


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    """The API alone (no torch): ledger + Redis queue; inference forwarded to the worker."""
    import uvicorn

    from api.app import create_app
    from api.backend_http import HttpBackend

    _check_exposure(args.host, settings)
    if not settings.database_url:
        raise SystemExit("KNOWPATCH_DATABASE_URL is required for the split deployment")
    worker_url = settings.worker_url or f"http://{settings.worker_host}:{settings.worker_port}"
    backend = HttpBackend(worker_url, timeout=settings.version_wait_s + 300, token=internal_token(settings))
    queue = _redis_queue(settings)
    if settings.fault_injection == "after_ledger_write":
        queue = _KillOnPublish(queue)
    app = create_app(settings, session_factory=_ledger(settings, migrate_first=False), queue=queue,
                     backend=backend, lifespan_hooks=[backend.lifespan])
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """The worker alone: owns the model, consumes the Redis stream, serves inference internally."""
    import uvicorn

    from workers.server import create_worker_app

    if not settings.database_url:
        raise SystemExit("KNOWPATCH_DATABASE_URL is required for the split deployment")
    _check_worker_exposure(settings)
    token = internal_token(settings)
    start = _BackgroundStart(settings, _ledger(settings, migrate_first=False), _redis_queue(settings))
    app = create_worker_app(start.holder, token=token, max_new_tokens_limit=settings.max_new_tokens_limit)
    log.info("knowpatch worker listening on %s:%d; the model loads behind it, /ready reports how far",
             settings.worker_host, settings.worker_port)
    start.start()
    try:
        uvicorn.run(app, host=settings.worker_host, port=settings.worker_port, log_level="info")
    finally:
        start.stop()
    return 1 if start.holder.failed is not None else 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Create or upgrade the ledger schema (Alembic) at KNOWPATCH_DATABASE_URL."""
    from service.ledger.db import migrate

    url = settings.resolved_database_url()
    _ledger(settings, migrate_first=False)  # creates the SQLite folder if needed
    migrate(url)
    log.info("ledger schema is up to date at %s", url.split("@")[-1])
    return 0


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    """Load (and convert) the model and compute its key statistics, so the first start is fast."""
    from service.bootstrap import build_editor

    editor = build_editor(settings)
    log.info("ready: %s", editor.info()["null_space_dims"])
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """Write the served model (ledger head, or --version) as a Hugging Face folder or a PEFT LoRA adapter."""
    from service.bootstrap import build_editor
    from service.export import export_merged, export_peft, ledger_state, replay

    if args.rank is not None and args.format != "peft":
        raise SystemExit("--rank applies to --format peft only")
    url = settings.resolved_database_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise SystemExit(f"no ledger at {url}: set KNOWPATCH_DATABASE_URL or KNOWPATCH_DATA_DIR as for the service")
    sessions = _ledger(settings, migrate_first=False)
    editor = build_editor(settings, keep_factors=False)
    with sessions() as session:
        state = ledger_state(session, editor.layers, version=args.version)
    replay(editor, state)
    if args.format == "merged":
        info = export_merged(editor, state, args.out)
    else:
        info = export_peft(editor, state, args.out, rank=args.rank)
    log.info("export: %s", {k: info[k] for k in ("format", "ledger_head_seq", "weights_digest", "active_edits")})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knowpatch", description=(__doc__ or "knowpatch").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, port in (("serve", cmd_serve, 8000), ("api", cmd_api, 8000)):
        p = sub.add_parser(name, help=(func.__doc__ or name).splitlines()[0])
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=port)
        p.set_defaults(func=func)
    for name, func in (("worker", cmd_worker), ("migrate", cmd_migrate), ("prepare", cmd_prepare)):
        sub.add_parser(name, help=(func.__doc__ or name).splitlines()[0]).set_defaults(func=func)
    p = sub.add_parser("export", help=(cmd_export.__doc__ or "export").splitlines()[0])
    p.add_argument("--format", choices=("merged", "peft"), default="merged")
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    p.add_argument("--version", type=int, default=None, help="a model version (ledger seq); default the head")
    p.add_argument("--rank", type=int, default=None, help="peft: truncate each layer to this rank by SVD")
    p.set_defaults(func=cmd_export)
    try:
        from evaluation.cli import add_eval_parser
    except ImportError:  # the evaluation is optional at run time
        pass
    else:
        add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call drowns the progress bar
    args = build_parser().parse_args(argv)
    try:
        if args.func.__module__ == __name__:
            return args.func(args, Settings())
        return args.func(args) or 0
    except KnowpatchError as exc:
        log.error("%s", exc.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
