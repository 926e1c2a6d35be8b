"""The ledger page at /ui, as an operator uses it in a browser: the list with its filters, search and
cursor paging; one edit's audit record; the playground; rollback and cancel, refused by the API for
a key without the scope; text from API users shown as text, never run."""
from __future__ import annotations

import re
import uuid
from typing import Any

import numpy as np
import pytest

from service.ledger import repository as repo
from service.ledger.codec import StoredFactor
from service.ledger.models import EDIT_STATUSES
from tests.api.conftest import Api, ApiRunner
from tests.ui.conftest import Stack, screenshot, use_key

expect = pytest.importorskip("playwright.sync_api", reason="the UI tests need the playwright package: "
                             "pip install -e '.[test]' (and Chromium: apt-get install chromium)").expect


def subjects_shown(page: Any) -> list[str]:
    return page.locator("#edits tbody tr:visible a.subject").all_inner_texts()


def test_list_filters_by_status_and_pages_with_the_cursors(stack: Stack, open_page) -> None:
    with stack.worker_paused():
        ids = [stack.submit(f"Tower {i}") for i in range(5)]
        for cancelled in (ids[1], ids[3]):
            assert stack.api.client.delete(f"/edits/{cancelled}").status_code == 200
    for applied in (ids[0], ids[2], ids[4]):
        stack.wait_for(applied, "applied")

    page = open_page(f"{stack.api.url}/ui")
    expect(page.locator("#ledger-message")).to_contain_text("401 Unauthorized: missing API key")
    use_key(page, "alice")
    expect(page.locator("#edits tbody tr")).to_have_count(5)
    assert subjects_shown(page) == [f"Tower {i}" for i in (4, 3, 2, 1, 0)]  # newest first

    page.select_option("#filter-status", "cancelled")
    expect(page.locator("#edits tbody tr")).to_have_count(2)
    assert subjects_shown(page) == ["Tower 3", "Tower 1"]

    page.select_option("#filter-status", "applied")
    expect(page.locator("#edits tbody tr")).to_have_count(3)
    page.fill("#filter-limit", "2")
    page.click("#filters button[type=submit]")
    expect(page.locator("#page-label")).to_have_text("page 1 · 2 edits")
    assert subjects_shown(page) == ["Tower 4", "Tower 2"]
    expect(page.locator("#prev-page")).to_be_disabled()
    page.click("#next-page")
    expect(page.locator("#page-label")).to_have_text("page 2 · 1 edit")
    assert subjects_shown(page) == ["Tower 0"]
    expect(page.locator("#next-page")).to_be_disabled()
    screenshot(page, "ledger-applied-page-2")
    page.click("#prev-page")
    expect(page.locator("#page-label")).to_have_text("page 1 · 2 edits")
    assert subjects_shown(page) == ["Tower 4", "Tower 2"]

    page.fill("#search", "tower 2")
    expect(page.locator("#edits tbody tr:visible")).to_have_count(1)
    expect(page.locator("#page-label")).to_contain_text("1 hidden by the search")
    page.fill("#search", "")

    page.select_option("#filter-status", "")
    page.fill("#filter-limit", "25")
    page.fill("#filter-subject", "Tower 3")
    page.click("#filters button[type=submit]")
    expect(page.locator("#edits tbody tr")).to_have_count(1)
    expect(page.locator("#edits tbody tr .badge")).to_have_text("cancelled")


def test_audit_record_shows_request_probabilities_history_factors_and_settings(stack: Stack, open_page) -> None:
    edit_id = stack.submit("Eiffel Tower", prompt="The Eiffel Tower is located in the city of",
                           rephrase_prompts=["Where is the Eiffel Tower? It stands in"],
                           locality_prompts=["The Colosseum is located in the city of"],
                           metadata={"ticket": "KB-7"})
    record = stack.wait_for(edit_id, "applied")

    page = open_page(f"{stack.api.url}/ui")
    use_key(page, "alice")
    page.click("#edits a.subject")
    audit = page.locator("#audit")
    expect(audit).to_be_visible()
    expect(page.locator("#audit-title")).to_contain_text(edit_id)
    expect(page.locator("#audit-title .badge")).to_have_text("applied")
    expect(page.locator("#request")).to_contain_text("Where is the Eiffel Tower? It stands in")
    expect(page.locator("#request pre")).to_contain_text('"ticket": "KB-7"')

    for section, key in (("prompt-0", "prompt"), ("rephrase-0", "rephrase"), ("locality-0", "locality")):
        row = page.locator(f"#probabilities tr[data-section={section}]")
        cells = row.locator("td.num")
        before = record["metrics_before"][key]
        after = record["metrics_after"][key]
        before, after = (before[0], after[0]) if isinstance(before, list) else (before, after)
        shown = [float(cells.nth(i).get_attribute("title")) for i in range(4)]
        assert shown == [before["target_new"], after["target_new"], before["target_true"], after["target_true"]]
    assert record["metrics_after"]["prompt"]["target_new"] > record["metrics_before"]["prompt"]["target_new"]

    events = page.locator("#history tbody tr td:first-child").all_inner_texts()
    assert events == [e["event"] for e in record["history"]] and "applied" in events
    checksums = page.locator("#factors td.checksum").all_inner_texts()
    assert checksums == [f["checksum"] for f in record["factors"]] and len(checksums) == 3
    expect(page.locator("#settings")).to_contain_text("profile")
    expect(page.locator("#settings")).to_contain_text(record["settings"]["profile"])
    gates = record["metrics_after"]["gates"]  # the worker runs the shipped gates: the record has them
    assert gates, "the worker's shipped quality gates recorded nothing"
    shown_gates = page.locator("#gates-after tbody th").all_inner_texts()
    assert shown_gates == list(gates)
    screenshot(page, "audit-applied")

    page.goto(f"{stack.api.url}/ui#/edits/{edit_id}")  # a link to the record opens it
    expect(page.locator("#audit-title")).to_contain_text(edit_id)


def test_audit_shows_quality_gates_when_the_record_has_them(api_runner: ApiRunner, open_page) -> None:
    ledger_api = api_runner.start()
    edit_id = ledger_api.client.post("/edits", json={"subject": "Big Ben", "prompt": "Big Ben is in",
                                                     "target_new": "Paris"}).json()["id"]
    gates = {"locality_drift": {"passed": True, "value": 0.01, "limit": 0.05},
             "efficacy": {"passed": False, "value": 0.4, "limit": 0.9}}
    record_applied(ledger_api, metrics_after={"prompt": {"target_new": 0.4}, "gates": gates})

    page = open_page(f"{ledger_api.url}/ui#/edits/{edit_id}")
    use_key(page, "root")
    gate_rows = page.locator("#gates-after tbody tr")
    expect(gate_rows).to_have_count(2)
    assert page.locator("#gates-after thead th").all_inner_texts() == ["gate", "passed", "value", "limit"]
    assert gate_rows.nth(1).locator("th, td").all_inner_texts() == ["efficacy", "false", "0.4", "0.9"]
    expect(gate_rows.nth(1)).to_have_class("failed")
    expect(page.locator("#gates-before")).to_have_count(0)
    screenshot(page, "audit-gates")


def record_applied(api: Api, metrics_after: dict[str, Any]) -> None:
    """Record the queued edit as applied, as a worker does (this API runs none)."""
    rng = np.random.default_rng(0)
    with api.ledger.begin() as session:
        ops = repo.mark_applying(session, repo.next_operations(session, 1), batch_id=uuid.uuid4().hex)
    with api.ledger.begin() as session:
        factors = [StoredFactor(layer=1, r=rng.standard_normal(4, dtype=np.float32),
                                a=rng.standard_normal(6, dtype=np.float32), k=rng.standard_normal(6, dtype=np.float32))]
        repo.record_applied(session, session.merge(ops[0]), factors=factors, metrics_before={"prompt": {}},
                            metrics_after=metrics_after, update_norms={1: 1.0}, layers=[1], weights_digest="d",
                            model_version=ops[0].seq)


def test_playground_generates_and_scores_stating_the_model_version(stack: Stack, open_page) -> None:
    record = stack.wait_for(stack.submit("Colosseum"), "applied")
    prompt = "Colosseum is located in the city of"
    expected = stack.api.as_("gen").post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 6}})
    assert expected.status_code == 200, expected.text

    page = open_page(f"{stack.api.url}/ui")
    use_key(page, "gen")
    page.fill("#gen-prompt", prompt)
    page.fill("#gen-max", "6")
    page.click("#generate-form button[type=submit]")
    expect(page.locator("#gen-version")).to_have_text(str(record["model_version"]))
    assert page.locator("#gen-text").text_content() == expected.json()["generated_text"]
    tokens = expected.json()["details"]["generated_tokens"]
    expect(page.locator("#gen-details")).to_contain_text(f"{tokens} tokens")

    page.fill("#score-prompt", prompt)
    page.fill("#score-candidates", " Rome\n Paris")
    page.click("#score-form button[type=submit]")
    expect(page.locator("#score-version")).to_have_text(str(record["model_version"]))
    expect(page.locator("#score-result tbody tr")).to_have_count(2)
    screenshot(page, "playground")
    # the ledger needs edits:write, which this key lacks: the page says so, in the API's words
    expect(page.locator("#ledger-message")).to_contain_text("403 Forbidden: API key 'gen' lacks the scope 'edits:write'")


def test_rollback_needs_an_admin_key_and_cancel_stops_a_queued_edit(stack: Stack, open_page) -> None:
    edit_id = stack.submit("Golden Gate Bridge")
    stack.wait_for(edit_id, "applied")
    page = open_page(f"{stack.api.url}/ui#/edits/{edit_id}")
    use_key(page, "alice")
    page.fill("#rollback-reason", "KB-9 was wrong")
    page.click("#rollback-form button[type=submit]")
    expect(page.locator("#audit-message")).to_contain_text(
        "403 Forbidden: API key 'alice' lacks the scope 'edits:admin'")
    screenshot(page, "rollback-refused")
    assert stack.record(edit_id)["status"] == "applied"

    use_key(page, "root")
    expect(page.locator("#audit-message")).to_have_text("")  # the audit reloaded with the new key
    page.fill("#rollback-reason", "KB-9 was wrong")
    page.click("#rollback-form button[type=submit]")
    expect(page.locator("#audit-message")).to_contain_text("rollback queued as seq")
    expect(page.locator("#audit-title .badge")).to_have_text("rolled_back")  # the page follows the worker
    expect(page.locator("#record")).to_contain_text("KB-9 was wrong")
    screenshot(page, "rolled-back")
    record = stack.record(edit_id)
    assert record["status"] == "rolled_back" and record["rollback_reason"] == "KB-9 was wrong"
    assert ("rollback_requested", "root") in [(e["event"], e["actor"]) for e in record["history"]]

    with stack.worker_paused():
        queued_id = stack.submit("Big Ben")
        page.goto(f"{stack.api.url}/ui#/edits/{queued_id}")
        expect(page.locator("#audit-title .badge")).to_have_text("queued")
        page.click("#cancel-edit")
        expect(page.locator("#audit-title .badge")).to_have_text("cancelled")
        assert stack.record(queued_id)["status"] == "cancelled"


def test_text_from_api_users_is_shown_as_text(stack: Stack, open_page) -> None:
    subject = '<img src=x onerror="window.pwned=1">'
    with stack.worker_paused():
        edit_id = stack.submit(subject, metadata={"note": "<script>window.pwned=2</script>"})
        page = open_page(f"{stack.api.url}/ui")
        use_key(page, "alice")
        expect(page.locator("#edits a.subject")).to_have_text(subject)
        page.click("#edits a.subject")
        expect(page.locator("#audit-title")).to_contain_text(edit_id)
    expect(page.locator("#request pre")).to_contain_text("<script>window.pwned=2</script>")
    assert page.locator("img").count() == 0 and page.locator("#audit script").count() == 0
    assert page.evaluate("window.pwned") is None


def test_without_api_keys_no_key_is_needed(api_runner: ApiRunner, open_page) -> None:
    api = api_runner.start(api_keys=None)
    assert api.as_(None).post("/edits", json={"subject": "Louvre", "prompt": "Louvre is in",
                                             "target_new": "Rome"}).status_code == 202
    page = open_page(f"{api.url}/ui")
    expect(page.locator("#server-info")).to_contain_text("no API keys configured: no key needed")
    expect(page.locator("#edits a.subject")).to_have_text("Louvre")


def test_page_is_served_with_a_strict_content_security_policy(api_runner: ApiRunner) -> None:
    api = api_runner.start()
    reply = api.as_(None).get("/ui")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    policy = reply.headers["content-security-policy"]
    assert re.search(r"script-src 'self'(;|$)", policy) and "default-src 'none'" in policy
    for asset in ("ledger.js", "ledger.css"):
        assert api.as_(None).get(f"/ui/assets/{asset}").status_code == 200


def test_the_status_filter_offers_every_status(api_runner: ApiRunner) -> None:
    page = api_runner.start().as_(None).get("/ui").text
    select = re.search(r'<select id="filter-status">(.*?)</select>', page, re.DOTALL)
    assert select, "the page has no status filter"
    options = re.findall(r"<option(?: value=\"\")?>([^<]*)</option>", select.group(1))
    assert options == ["any", *EDIT_STATUSES]  # a fixed list: a new status must be added to the page
