"""Shared fixtures. Postgres and Redis are required services (see docker-compose.yml): tests that
need them fail, with the reason, when they are unreachable; nothing is skipped.

Override the servers with KNOWPATCH_TEST_POSTGRES (an admin URL, psycopg form) and
KNOWPATCH_TEST_REDIS.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("KNOWPATCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("KNOWPATCH_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh, empty Postgres database, dropped after the test."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import URL

    name = f"kp_test_{uuid.uuid4().hex[:16]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres is required for this test but {PG_ADMIN_URL} is unreachable "
                    f"(start it, or set KNOWPATCH_TEST_POSTGRES): {exc}", pytrace=False)
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            info = admin.info
            url = URL.create("postgresql+psycopg", username=info.user, password=info.password or None,
                             host=info.host, port=info.port, database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            # FORCE: a test that leaked a connection must not leave its database behind
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLAlchemy URL of a SQLite file that does not exist yet (in a folder that does not either)."""
    return f"sqlite:///{tmp_path / 'ledger' / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """Runs the test on both ledger backends."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def redis_url() -> str:
    """The URL of the test Redis, checked to answer. Tests must use unique key names and delete them."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required for this test but {REDIS_TEST_URL} is unreachable "
                    f"(start it, or set KNOWPATCH_TEST_REDIS): {exc}", pytrace=False)
    finally:
        client.close()
    return REDIS_TEST_URL
