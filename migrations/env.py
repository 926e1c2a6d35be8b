"""Alembic environment of the ledger.

URL precedence: `-x url=...` on the command line, then the URL handed over by
service.ledger.db.migrate() (config.attributes["url"]), then KNOWPATCH_DATABASE_URL / the embedded
SQLite default from service.config.Settings.
"""
from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from service.config import Settings
from service.ledger.db import make_engine
from service.ledger.models import Base

config = context.config
target_metadata = Base.metadata

# Only the alembic command line configures logging: when migrate() runs inside the service, the
# service's own logging must be left alone.
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.attributes.get("url")
    return url or Settings().resolved_database_url()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    """SQLite batch migrations copy a table and drop the old copy, whose rows the other tables
    reference: with foreign keys enforced that fails on any ledger with data (deferring the checks
    does not help: SQLite counts the deleted references, not the copied ones). The pragma is ignored
    inside a transaction, so it is set on the driver's connection before the migrations' begins."""
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")


def run_migrations_online() -> None:
    engine = make_engine(_url())  # same SQLite pragmas as the service (foreign keys, WAL)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                _sqlite_foreign_keys(connection, on=False)
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:  # the copies must have kept every reference: else nothing is committed
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")
            if sqlite:
                _sqlite_foreign_keys(connection, on=True)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
