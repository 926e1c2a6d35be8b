"""Alembic migrations of the ledger on real SQLite and real Postgres."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service.ledger import repository as repo
from service.ledger.db import alembic_config, make_engine, migrate, session_factory
from service.ledger.models import Base

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"edits", "operations", "edit_factors", "edit_events", "idempotency_keys"}


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrate_creates_the_schema_of_the_models(ledger_url: str) -> None:
    migrate(ledger_url)
    assert TABLES <= _tables(ledger_url)
    engine = make_engine(ledger_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations disagree; add a migration: {diff}"
    finally:
        engine.dispose()


def test_migrate_twice_is_a_no_op(ledger_url: str) -> None:
    migrate(ledger_url)
    engine = make_engine(ledger_url)
    try:
        with session_factory(engine).begin() as s:
            repo.create_edits(s, [{"subject": "A"}], subjects=["A"], requested_by="a", method="alphaedit",
                              idempotency_key=None)
        migrate(ledger_url)
        assert _revision(ledger_url) == "0005"
        with session_factory(engine)() as s:
            assert repo.queue_depth(s) == 1  # data untouched
    finally:
        engine.dispose()


def test_downgrade_to_base_and_up_again(ledger_url: str) -> None:
    migrate(ledger_url)
    command.downgrade(alembic_config(ledger_url), "base")
    assert _tables(ledger_url) & TABLES == set()
    assert _revision(ledger_url) is None
    migrate(ledger_url)
    assert TABLES <= _tables(ledger_url)


def test_migrate_creates_the_sqlite_folder(sqlite_url: str) -> None:
    folder = Path(sqlite_url.removeprefix("sqlite:///")).parent
    assert not folder.exists()
    migrate(sqlite_url)
    assert folder.is_dir() and _revision(sqlite_url) == "0005"


def test_alembic_command_line_takes_the_url_from_x(sqlite_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "KNOWPATCH_DATABASE_URL": "sqlite:////nonexistent/never/used.db"}
    run = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "migrations" / "alembic.ini"), "-x", f"url={sqlite_url}",
         "upgrade", "head"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert _revision(sqlite_url) == "0005"


def test_alembic_command_line_falls_back_to_the_environment(sqlite_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "KNOWPATCH_DATABASE_URL": sqlite_url}
    run = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "migrations" / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM edits")).scalar() == 0
    finally:
        engine.dispose()


def test_status_migrations_keep_a_ledger_with_edits_and_downgrade_dry_runs_as_failed(ledger_url: str) -> None:
    migrate(ledger_url, "0003")  # before the statuses 'rejected' (0004) and 'checked' (0005)
    engine = make_engine(ledger_url)
    try:
        with session_factory(engine).begin() as s:
            [old], _ = repo.create_edits(s, [{"subject": "A"}], subjects=["A"], requested_by="a",
                                         method="alphaedit", idempotency_key=None)
        migrate(ledger_url)  # SQLite copies the edits table, which the operations reference
        with session_factory(engine).begin() as s:
            [edit], _ = repo.create_edits(s, [{"subject": "B"}], subjects=["B"], requested_by="a", method="alphaedit",
                                          idempotency_key=None)
            ops = repo.mark_applying(s, repo.next_operations(s, 2), "b")
            repo.record_checked(s, ops[1], verdict="dry run", metrics_before=None, metrics_after={"gates": {}})
        command.downgrade(alembic_config(ledger_url), "0004")
        with engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT id, status FROM edits")).all())
            error = conn.execute(text("SELECT error FROM edits WHERE id = :i"), {"i": edit.id}).scalar()
        assert rows == {old.id: "applying", edit.id: "failed"} and "dry run" in error
        migrate(ledger_url)
        assert _revision(ledger_url) == "0005"
    finally:
        engine.dispose()
