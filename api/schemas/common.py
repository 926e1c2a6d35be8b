"""Field types shared by the request bodies."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from service.engine.validation import is_blank, text_problem


def plain_text(value: str) -> str:
    """Refuse NUL (Postgres text cannot store it) and lone surrogates (no UTF-8 encoding, so no JSON
    to the worker either); pydantic itself lets both through a str without length limits."""
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def not_blank(value: str) -> str:
    if is_blank(value):  # zero-width characters included
        raise ValueError("must not be empty or only whitespace")
    return plain_text(value)


# For the OpenAPI document (an ECMA regex, not enforced as such): some character is not whitespace.
NON_BLANK_PATTERN = r"\S"
PlainText = Annotated[str, AfterValidator(plain_text)]
NonBlank = Annotated[str, AfterValidator(not_blank), Field(json_schema_extra={"pattern": NON_BLANK_PATTERN})]

# Tags of the discriminated union of POST /edits bodies; pydantic puts them in error locations,
# and api.errors leaves them out of the field paths it reports.
SINGLE_EDIT_TAG = "single edit"
EDIT_LIST_TAG = "edit list"
UNION_TAGS = frozenset({SINGLE_EDIT_TAG, EDIT_LIST_TAG})
