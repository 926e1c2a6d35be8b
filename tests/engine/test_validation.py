"""Edit requests that can never succeed are refused when built, with a message saying why."""
from __future__ import annotations

import pytest

from service.engine.types import EditRequest
from service.errors import InvalidRequest

OK = dict(subject="Eiffel Tower", prompt="The Eiffel Tower is in", target_new="Rome", target_true="Paris")


@pytest.mark.parametrize("change, message", [
    ({"prompt": "The tower is in"}, "must contain the subject"),
    ({"prompt": "{} is in {}"}, "at most one"),
    ({"subject": "  "}, "subject must be a non-empty"),
    ({"target_new": ""}, "target_new must be a non-empty"),
    ({"target_new": "Paris"}, "must differ"),
    ({"prompt": "Eiffel Tower " + "x" * 1000}, "limit is 1000"),
    ({"prompt": "{}"}, "besides the subject"),
])
def test_bad_requests_are_refused(change, message):
    with pytest.raises(InvalidRequest, match=message):
        EditRequest(**(OK | change))


def test_template_puts_the_placeholder_where_the_subject_is():
    assert EditRequest(**OK).template == "The {} is in"
    assert EditRequest(**(OK | {"prompt": "Where is {}?"})).template == "Where is {}?"
    assert EditRequest.from_dict(OK | {"rephrase_prompts": ["Eiffel Tower?"]}).rephrase_prompts == ("Eiffel Tower?",)
