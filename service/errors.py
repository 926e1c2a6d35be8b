"""The project's exceptions. Each class carries its HTTP status once; every transport (the public
API, the worker's internal server, the clients of both) reads it from here."""
from __future__ import annotations

import json
from typing import Any, ClassVar


class KnowpatchError(Exception):
    """Base class: `message` is written for the person who has to act on it. Anything not listed
    below is a fault on the server's side (500)."""

    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        """The wire form every route answers with: {"error": {"type", "message"}}."""
        return {"error": {"type": type(self).__name__, "message": self.message}}


class InvalidRequest(KnowpatchError):
    """The input can never succeed as given."""

    status = 422


class NotFound(KnowpatchError):
    """The named object does not exist."""

    status = 404


class Conflict(KnowpatchError):
    """The object exists but is in a state that forbids the operation."""

    status = 409


class ModelMoved(Conflict):
    """The served model changed version between two reads that must see one version; read again."""


class Unauthorized(KnowpatchError):
    """Missing or unknown credentials."""

    status = 401


class Forbidden(KnowpatchError):
    """Known credentials without the needed scope."""

    status = 403


class Unavailable(KnowpatchError):
    """A dependency (model, ledger, queue, worker) is not ready; retry later."""

    status = 503


class Overloaded(Unavailable):
    """A bounded queue is full (too many requests wait already); retry after Retry-After seconds."""

    status = 429


class UnsupportedArchitecture(KnowpatchError):
    """The model's architecture has no adapter."""


class EditFailed(KnowpatchError):
    """An edit could not be computed or failed its safety checks; the model is unchanged."""

    status = 422


class LedgerCorrupt(KnowpatchError):
    """The ledger's hash chain or stored factors do not verify."""


def _classes(base: type[KnowpatchError]) -> list[type[KnowpatchError]]:
    return [base] + [c for sub in base.__subclasses__() for c in _classes(sub)]


def error_class(name: str) -> type[KnowpatchError] | None:
    return next((cls for cls in _classes(KnowpatchError) if cls.__name__ == name), None)


# A reply that is not our error body still says something through its status alone; a bare 404 or
# 405 says the URL is wrong, a fault of the configuration, not of the caller's request.
_BY_STATUS: dict[int, type[KnowpatchError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: KnowpatchError, 405: KnowpatchError,
    422: InvalidRequest, 429: Unavailable, 503: Unavailable,
}


def error_from_reply(status: int, body: bytes | str, where: str) -> KnowpatchError:
    """The exception an error reply of a knowpatch server stands for: the class it names when the body
    is our error body, else one chosen by the status, with the start of the body as the message."""
    try:
        error = json.loads(body)["error"]
        cls = error_class(str(error["type"]))
        if cls is not None:
            return cls(str(error["message"]))
        message = f"{where}: {error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        text = body[:300] if isinstance(body, str) else body[:300].decode(errors="replace")
        hint = " (is it a knowpatch server of the same version?)" if status in (404, 405) else ""
        message = f"{where} answered {status}: {text}{hint}"
    fallback = _BY_STATUS.get(status, InvalidRequest if 400 <= status < 500 else KnowpatchError)
    return fallback(message)
