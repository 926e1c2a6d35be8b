"""What /ready and /info report. Each part is asked separately, with a time limit, so one that is
down is named and the others are still reported."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from api.schemas.health import Info, LedgerHead, Readiness
from service.config import Settings
from service.errors import KnowpatchError
from service.inference import BackendInfo, InferenceBackend
from service.ledger import repository as repo
from service.ledger.db import ping
from service.queue import OperationQueue

T = TypeVar("T")
CHECK_TIMEOUT_S = 5.0
NO_BACKEND = "no inference backend configured"
NOT_READY = "the model is loading or the worker is replaying the ledger"
OK = "ok"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KnowpatchError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return f"did not answer within {CHECK_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {exc}"


async def _ask(call: Awaitable[T]) -> tuple[T | None, str]:
    """(the answer, "ok"), or (None, why not)."""
    try:
        return await asyncio.wait_for(call, CHECK_TIMEOUT_S), OK
    except Exception as exc:
        return None, _reason(exc)


def _in_thread(call: Callable[[], T]) -> Awaitable[T]:
    return asyncio.to_thread(call)  # ledger and queue clients block


def ping_ledger(ledger: sessionmaker[Session]) -> None:
    with ledger() as session:
        ping(session.get_bind().engine)


def ledger_state(ledger: sessionmaker[Session]) -> tuple[LedgerHead, int]:
    with ledger() as session:
        seq, digest = repo.head(session)
        return LedgerHead(seq=seq, hash=digest), repo.queue_depth(session)


async def backend_info(backend: InferenceBackend | None) -> tuple[BackendInfo | None, str]:
    if backend is None:
        return None, NO_BACKEND
    return await _ask(backend.info())


async def readiness(ledger: sessionmaker[Session], queue: OperationQueue,
                    backend: InferenceBackend | None) -> Readiness:
    info, backend_check = await backend_info(backend)
    if info is not None and not info.ready:
        backend_check = str(info.details.get("not_ready") or NOT_READY)  # the backend's own reason, if it gives one
    checks = {"ledger": (await _ask(_in_thread(lambda: ping_ledger(ledger))))[1],
              "queue": (await _ask(_in_thread(queue.ping)))[1], "backend": backend_check}
    failing = [f"{name}: {why}" for name, why in checks.items() if why != OK]
    message = "not ready: " + "; ".join(failing) if failing else "ready"
    progress = info.details.get("progress") if info is not None and not info.ready else None
    return Readiness(ready=not failing, checks=checks, message=message, progress=progress or None)


async def info(settings: Settings, ledger: sessionmaker[Session], queue: OperationQueue,
               backend: InferenceBackend | None, auth_enabled: bool) -> Info:
    model, backend_check = await backend_info(backend)
    state, ledger_check = await _ask(_in_thread(lambda: ledger_state(ledger)))
    depth, queue_check = await _ask(_in_thread(queue.depth))
    checks = {"backend": backend_check, "ledger": ledger_check, "queue": queue_check}
    details = dict(model.details) if model else {}
    head, pending = state or (LedgerHead(seq=None, hash=None), None)
    return Info(model=model.model if model else settings.model, model_version=model.model_version if model else None,
                method=str(details.get("method", settings.method)), details=details, ledger_head=head,
                queue_depth=depth, pending_operations=pending, auth_enabled=auth_enabled,
                problems=[f"{name}: {why}" for name, why in checks.items() if why != OK])
