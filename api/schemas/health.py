"""Bodies of /health, /ready and /info."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str = "ok"


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "ready": False, "checks": {"ledger": "ok", "queue": "ok", "backend": "no inference backend configured"},
        "message": "not ready: backend: no inference backend configured"}]})

    ready: bool
    checks: dict[str, str] = Field(description="'ok', or why that part is not ready")
    message: str
    progress: dict[str, Any] | None = Field(default=None, description=(
        "while the model loads: the start's phase, done, total, unit, elapsed_s and eta_s (from the rate so far)"))


class LedgerHead(BaseModel):
    seq: int | None
    hash: str | None


class Info(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "smollm2", "model_version": 41, "method": "alphaedit",
        "details": {"layers": [4, 5, 6], "dtype": "float32"}, "ledger_head": {"seq": 41, "hash": "ab12..."},
        "queue_depth": 0, "pending_operations": 0, "auth_enabled": True, "problems": []}]})

    model: str | None
    model_version: int | None
    method: str
    details: dict[str, Any] = Field(description="what the model backend reports (layers edited, dtype, device...)")
    ledger_head: LedgerHead
    queue_depth: int | None = Field(description="messages in the work queue")
    pending_operations: int | None = Field(description="ledger operations queued or being applied")
    auth_enabled: bool
    problems: list[str] = Field(description="parts that did not answer; the other fields are still right")
