"""Engines, sessions and migrations of the ledger database (SQLite or Postgres)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from service.errors import Unavailable

SQLITE_BUSY_TIMEOUT_MS = 30_000
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


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for a ledger URL; on SQLite: foreign keys, WAL, busy timeout, serialized writes."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)  # survive a Postgres restart
        return create_engine(u, **kwargs)
    parent = _sqlite_parent(u)
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    kwargs["connect_args"] = {"check_same_thread": False, **kwargs.get("connect_args", {})}
    if _is_memory(u):
        kwargs.setdefault("poolclass", StaticPool)  # one shared connection, else each one is a new empty DB
    engine = create_engine(u, **kwargs)
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the API returns them after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    """Raise Unavailable unless the ledger database answers."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
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
