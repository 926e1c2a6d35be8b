"""Loading the shared benchmark files into cases, where they lie."""
from __future__ import annotations

import json

import pytest

from service.errors import InvalidRequest
from evaluation.data import load_cases, load_heldout, load_knowns
from tests.conftest import shared_data


def test_counterfact_cases_keep_file_order_and_fields():
    path = shared_data("counterfact")
    records = json.loads(path.read_text())[:3]
    loaded = load_cases("counterfact", path, n=3)
    first = loaded.cases[0]
    assert [c.case_id for c in loaded.cases] == [str(r["case_id"]) for r in records]
    assert first.subject in first.prompt and first.target_new != first.target_true
    assert len(first.rephrase_prompts) == 1 and first.locality_answer == first.target_true
    assert first.request().rephrase_prompts == ()  # the editor never sees the evaluation prompts


def test_zsre_maps_alt_to_the_new_target_and_scores_the_loc_question_as_the_reference_does():
    path = shared_data("zsre")
    record = json.loads(path.read_text())[0]
    case = load_cases("zsre", path, n=1).cases[0]
    assert (case.prompt, case.target_new, case.target_true) == (record["src"], record["alt"], record["answers"][0])
    assert case.rephrase_prompts == (record["rephrase"],)
    assert case.locality_prompt == record["loc"] + "?" and case.locality_prompt.startswith("nq question: ")
    assert case.locality_answer == record["loc_ans"]


def test_cases_the_engine_would_refuse_are_left_out_and_counted(tmp_path):
    common = {"rephrase": "Made by?", "loc": "nq question: q", "loc_ans": "y"}
    records = [
        {"subject": "A", "src": "Who made A?", "alt": "X", "answers": ["X"], **common},  # new == true
        {"subject": "B", "src": "Who made B?", "alt": "Y", "answers": ["Z"], **common},
        {"subject": "C", "src": "Who made C?"},  # fields missing
    ]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(records))
    loaded = load_cases("zsre", path)
    assert [c.subject for c in loaded.cases] == ["B"]
    assert "differ" in loaded.skipped["0"] and "malformed" in loaded.skipped["2"]
    with pytest.raises(InvalidRequest, match="only 1 editable"):
        load_cases("zsre", path, n=2)


def test_missing_file_names_the_option(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_cases("counterfact", tmp_path / "nope.json")


def test_knowns_subset_is_fixed_and_spread():
    path = shared_data("knowns")
    first, again = load_knowns(path, count=50), load_knowns(path, count=50)
    assert first == again and len(first) == 50
    assert first[-1].known_id > 1000  # reaches the end of the file, not the first 50 facts


def test_heldout_is_the_end_of_the_file():
    heldout = load_heldout(shared_data("wikitext"), chunks=4, words_per_chunk=50)
    text = heldout.path.read_text()
    assert len(heldout.chunks) == 4 and all(len(c.split()) == 50 for c in heldout.chunks)
    assert text[heldout.start_char :].split() == " ".join(heldout.chunks).split()
    assert heldout.start_char > len(text) * 0.9
