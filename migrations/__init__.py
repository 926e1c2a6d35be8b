"""Alembic migrations of the ledger schema; service.ledger.db.migrate() runs them."""
