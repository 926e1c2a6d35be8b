"""Bearer API keys with scopes.

KNOWPATCH_API_KEYS is either inline, 'name:key:scope1,scope2;name2:key2:scope', or the path of a
JSON file '[{"name": ..., "key": ..., "scopes": [...]}]'. With no keys configured every request is
served as "anonymous" with every scope (the CLI then binds loopback only).
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import Settings
from service.errors import Forbidden, InvalidRequest, Unauthorized

SCOPES = ("generate", "edits:write", "edits:admin")
IMPLIED_SCOPES = {"edits:admin": ("edits:write",)}
ANONYMOUS_NAME = "anonymous"


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the key: compared in constant time, never kept in clear
    scopes: frozenset[str]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name is recorded as requested_by / actor in the ledger."""

    name: str
    scopes: frozenset[str]


ANONYMOUS = Principal(ANONYMOUS_NAME, frozenset(SCOPES))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _make_key(name: str, key: str, scopes: list[str], where: str) -> ApiKey:
    if not name.strip() or not key.strip():
        raise InvalidRequest(f"KNOWPATCH_API_KEYS: {where} needs a non-empty name and key")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidRequest(f"KNOWPATCH_API_KEYS: key {name!r} has scopes {scopes}; "
                             f"use one or more of {', '.join(SCOPES)}")
    expanded = set(scopes).union(*(IMPLIED_SCOPES.get(s, ()) for s in scopes))
    return ApiKey(name=name.strip(), digest=_digest(key), scopes=frozenset(expanded))


def _parse_inline(spec: str) -> list[ApiKey]:
    keys = []
    for i, entry in enumerate(e.strip() for e in spec.split(";")):
        if not entry:
            continue
        parts = entry.split(":", 2)  # scopes contain ':' themselves (edits:write), names and keys must not
        if len(parts) != 3:
            raise InvalidRequest(f"KNOWPATCH_API_KEYS entry {i + 1} is not 'name:key:scope1,scope2'")
        name, key, scopes = parts
        keys.append(_make_key(name, key, [s.strip() for s in scopes.split(",") if s.strip()], f"entry {i + 1}"))
    return keys


def _parse_file(path: Path) -> list[ApiKey]:
    try:
        entries: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"KNOWPATCH_API_KEYS: cannot read the key file {path}: {exc}") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidRequest(f"KNOWPATCH_API_KEYS: {path} must hold a JSON list of {{name, key, scopes}} objects")
    return [_make_key(str(e.get("name", "")), str(e.get("key", "")), list(e.get("scopes") or []), f"{path} item {i}")
            for i, e in enumerate(entries)]


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".json") or Path(spec).expanduser().is_file()


def load_api_keys(spec: str | None) -> tuple[ApiKey, ...]:
    """Parse the setting; raise InvalidRequest (naming the problem) on a malformed one."""
    spec = (spec or "").strip()
    if not spec:
        return ()
    keys = _parse_file(Path(spec).expanduser()) if _looks_like_path(spec) else _parse_inline(spec)
    names = [k.name for k in keys]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidRequest(f"KNOWPATCH_API_KEYS: key names must be unique; repeated: {', '.join(duplicates)}")
    if len({k.digest for k in keys}) != len(keys):
        raise InvalidRequest("KNOWPATCH_API_KEYS: two entries share the same key; give each its own")
    return tuple(keys)


def auth_enabled(settings: Settings) -> bool:
    return bool(load_api_keys(settings.api_keys))


def identify(keys: tuple[ApiKey, ...], presented: str) -> ApiKey | None:
    """The key matching `presented`, comparing against every key in constant time."""
    digest = _digest(presented)
    found = None
    for key in keys:
        if hmac.compare_digest(key.digest, digest):
            found = key
    return found


def authorize(keys: tuple[ApiKey, ...], token: str | None, needed: list[str]) -> Principal:
    """The caller, if `token` is a known key holding every scope in `needed`."""
    if not keys:
        return ANONYMOUS
    if not token:
        raise Unauthorized("missing API key: send it as the header 'Authorization: Bearer <key>'")
    key = identify(keys, token)
    if key is None:
        raise Unauthorized("unknown API key: check the key, or ask the operator for one")
    missing = [scope for scope in needed if scope not in key.scopes]
    if missing:
        raise Forbidden(f"API key {key.name!r} lacks the scope {missing[0]!r} needed here "
                        f"(it has: {', '.join(sorted(key.scopes))})")
    return Principal(name=key.name, scopes=key.scopes)
