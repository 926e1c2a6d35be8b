"""The edit ledger: the source of truth of which edits the model carries (architecture principle 2).

models: the tables; codec: factor bytes and checksums; repository: every read and write (callers own
the transaction); db: engines, sessions and migrations.
"""
from service.ledger.codec import StoredFactor, decode_array, encode_array, factor_checksum
from service.ledger.db import make_engine, migrate, ping, session_factory
from service.ledger.models import ZERO_HASH, Edit, EditEvent, EditFactor, IdempotencyKey, Operation
from service.ledger.repository import ActiveEdit

__all__ = [
    "ActiveEdit", "Edit", "EditEvent", "EditFactor", "IdempotencyKey", "Operation", "StoredFactor", "ZERO_HASH",
    "decode_array", "encode_array", "factor_checksum", "make_engine", "migrate", "ping", "session_factory",
]
