"""Field types shared by the request bodies."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


NonBlank = Annotated[str, AfterValidator(not_blank)]

# Tags of the discriminated union of POST /edits bodies; pydantic puts them in error locations,
# and api.errors leaves them out of the field paths it reports.
SINGLE_EDIT_TAG = "single edit"
EDIT_LIST_TAG = "edit list"
UNION_TAGS = frozenset({SINGLE_EDIT_TAG, EDIT_LIST_TAG})
