"""The rules of an edit request, checked when an EditRequest is built (service.engine.types), so a
request that exists is valid wherever it came from; the API's schemas quote the same limits."""
from __future__ import annotations

import unicodedata
from typing import Any

from service.errors import InvalidRequest

MAX_SUBJECT_CHARS = 200
MAX_PROMPT_CHARS = 1000
MAX_TARGET_CHARS = 200
MAX_EXTRA_PROMPTS = 16


def is_blank(value: str) -> bool:
    """Nothing visible: only whitespace, control and format characters (zero-width space, BOM, ...),
    which str.strip() alone would let through."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in value)


def text_problem(value: str) -> str | None:
    """Why the ledgers cannot store `value`, or None. A lone surrogate has no UTF-8 encoding (JSON
    escapes such as "\\ud800" decode to one), and Postgres text refuses NUL while SQLite keeps it:
    both are refused so that every ledger accepts the same requests."""
    if "\x00" in value:
        return "contains a NUL character (U+0000)"
    surrogate = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    if surrogate is not None:
        return f"contains a lone surrogate (U+{ord(surrogate):04X}), which is not valid Unicode text"
    return None


def check_json_text(name: str, value: Any) -> None:
    """Raise InvalidRequest if a string anywhere in JSON data `value` (keys included) has a text_problem."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise InvalidRequest(f"{name} {problem}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json_text(f"a key of {name}", key)
            check_json_text(f"{name}.{key}", item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json_text(f"{name}[{i}]", item)


def _check_text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str) or is_blank(value):
        raise InvalidRequest(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise InvalidRequest(f"{name} is {len(value)} characters; the limit is {limit}")
    check_json_text(name, value)
    return value


def _check_prompt_list(name: str, prompts: tuple[str, ...]) -> None:
    if len(prompts) > MAX_EXTRA_PROMPTS:
        raise InvalidRequest(f"{name} has {len(prompts)} prompts; the limit is {MAX_EXTRA_PROMPTS}")
    for i, prompt in enumerate(prompts):
        _check_text(f"{name}[{i}]", prompt, MAX_PROMPT_CHARS)


def check_edit(subject: object, prompt: object, target_new: object, target_true: object,
               rephrase_prompts: tuple[str, ...], locality_prompts: tuple[str, ...]) -> None:
    """Raise InvalidRequest with an actionable message for a request that can never be applied."""
    subject = _check_text("subject", subject, MAX_SUBJECT_CHARS)
    prompt = _check_text("prompt", prompt, MAX_PROMPT_CHARS)
    braces = prompt.count("{}")
    if braces > 1:
        raise InvalidRequest("prompt must contain at most one '{}' placeholder for the subject")
    if braces == 0 and subject not in prompt:
        raise InvalidRequest(
            f"prompt must contain the subject {subject!r} verbatim or one '{{}}' placeholder"
        )
    template = prompt if braces else prompt.replace(subject, "{}", 1)
    if template.replace("{}", "").strip() == "":
        raise InvalidRequest("prompt must contain text besides the subject")
    target_new = _check_text("target_new", target_new, MAX_TARGET_CHARS)
    if target_true is not None:
        target_true = _check_text("target_true", target_true, MAX_TARGET_CHARS)
        if target_true.strip() == target_new.strip():
            raise InvalidRequest("target_new must differ from target_true")
    _check_prompt_list("rephrase_prompts", rephrase_prompts)
    _check_prompt_list("locality_prompts", locality_prompts)
