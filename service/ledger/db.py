"""Engines, sessions and migrations of the ledger database (SQLite or Postgres)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from service.errors import Unavailable

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10  # a host that drops packets is a 503 in seconds, not a hung request
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def _sqlite_parent(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or _is_memory(url) or url.query.get("uri"):
        return None
    return Path(str(url.database)).expanduser().resolve().parent


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Take transaction control away from pysqlite, which would otherwise run SELECTs outside any
    # transaction (see _on_sqlite_begin).
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    finally:
        cur.close()


def _on_sqlite_begin(conn: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock at the start of every transaction, so SQLite transactions
    # are serialized: read-check-write sequences (idempotency keys, status transitions) are atomic,
    # seqs are allocated in commit order, and a writer never hits SQLITE_BUSY_SNAPSHOT (which the busy
    # timeout does not retry). Ledger transactions are short, so this costs little.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _raise_unavailable(context: ExceptionContext) -> None:
    """handle_error hook, the one place where a ledger database that cannot be used right now (down,
    restarting, refusing connections, the connection cut, locked past the busy timeout) becomes
    Unavailable: the API answers 503 and the worker backs off and retries, and both recover by
    themselves when it is back (the pool's pre-ping replaces dead connections)."""
    error = context.sqlalchemy_exception
    if context.is_pre_ping or not isinstance(error, (OperationalError, InterfaceError)):
        return  # the pre-ping must see the driver's error to reconnect
    if getattr(context.original_exception, "sqlite_errorname", None) == "SQLITE_ERROR":
        # SQLite's generic code: a missing table or column, SQL this schema cannot run. A fault of
        # the schema or the code, as the same statement on Postgres (ProgrammingError): not an outage.
        return
    where = context.engine.url.render_as_string(hide_password=True) if context.engine else context.dialect.name
    detail = " ".join(str(context.original_exception).split())  # psycopg's messages span lines
    raise Unavailable(f"the ledger database at {where} is unavailable: "
                      f"{type(context.original_exception).__name__}: {detail}")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for a ledger URL; on SQLite: foreign keys, WAL, busy timeout, serialized writes.
    Either way an unusable database raises Unavailable (_raise_unavailable)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)  # survive a Postgres restart
        if u.get_driver_name() in ("psycopg", "psycopg2"):  # libpq drivers
            kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S, **kwargs.get("connect_args", {})}
        engine = create_engine(u, **kwargs)
        event.listen(engine, "handle_error", _raise_unavailable)
        return engine
    parent = _sqlite_parent(u)
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    kwargs["connect_args"] = {"check_same_thread": False, **kwargs.get("connect_args", {})}
    if _is_memory(u):
        kwargs.setdefault("poolclass", StaticPool)  # one shared connection, else each one is a new empty DB
    engine = create_engine(u, **kwargs)
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    event.listen(engine, "handle_error", _raise_unavailable)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the API returns them after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    """Raise Unavailable unless the ledger database answers."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:  # what _raise_unavailable leaves alone, or an engine made elsewhere
        where = engine.url.render_as_string(hide_password=True)
        raise Unavailable(f"the ledger database at {where} is unreachable: {exc.__class__.__name__}: {exc}") from exc


def alembic_config(url: str) -> Any:
    """An Alembic Config for the packaged migrations, aimed at `url`."""
    from alembic.config import Config  # imported here: only migrations need alembic

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url  # read by migrations/env.py; avoids ini interpolation of '%' in passwords
    cfg.attributes["configure_logging"] = False  # leave the host process's logging alone
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the ledger schema at `url` up to `revision` (a no-op when it is already there)."""
    from alembic import command

    parent = _sqlite_parent(make_url(url))
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)
