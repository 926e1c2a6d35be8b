"""The project's exceptions. Transport layers map these to status codes in one place."""
from __future__ import annotations


class KnowpatchError(Exception):
    """Base class: `message` is written for the person who has to act on it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(KnowpatchError):
    """The input can never succeed as given (maps to 400/422)."""


class NotFound(KnowpatchError):
    """The named object does not exist (maps to 404)."""


class Conflict(KnowpatchError):
    """The object exists but is in a state that forbids the operation (maps to 409)."""


class Unauthorized(KnowpatchError):
    """Missing or unknown credentials (maps to 401)."""


class Forbidden(KnowpatchError):
    """Known credentials without the needed scope (maps to 403)."""


class Unavailable(KnowpatchError):
    """A dependency (model, ledger, queue, worker) is not ready (maps to 503)."""


class UnsupportedArchitecture(KnowpatchError):
    """The model's architecture has no adapter."""


class EditFailed(KnowpatchError):
    """An edit could not be computed or failed its safety checks; the model is unchanged."""


class LedgerCorrupt(KnowpatchError):
    """The ledger's hash chain or stored factors do not verify."""
