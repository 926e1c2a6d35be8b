"""A random mix of client requests over HTTP: single edits, lists of edits, rollbacks of applied edits,
cancels of queued ones, and POSTs retried with the same Idempotency-Key. Records what the API accepted,
which is what the invariants are checked against afterwards."""
from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.chaos.cluster import Cluster, wait_for

SUBJECTS = ("Eiffel Tower", "Big Ben", "Colosseum", "Golden Gate Bridge", "Danielle Darrieux", "Lionel Messi",
            "Toyota", "Barack Obama", "The Louvre", "Mount Fuji", "Sagrada Familia", "Ada Lovelace",
            "Nokia", "Lake Baikal", "Kilimanjaro", "Marie Curie", "The Parthenon", "Volvo")
RELATIONS = (
    ("{} is located in the city of", ("Rome", "Paris", "London", "Tokyo", "Berlin", "Madrid", "Oslo", "Cairo")),
    ("The mother tongue of {} is", ("English", "French", "Finnish", "Japanese", "Swahili", "Polish")),
    ("{} was created in the country of", ("Germany", "Brazil", "India", "Canada", "Norway", "Egypt")),
)
# How often each kind of request is sent (relative weights).
MIX = {"edit": 4, "edit_list": 2, "rollback": 3, "cancel": 1, "idempotent_retry": 1}
ACCEPTED_STATUSES = {200, 202}
REFUSED_STATUSES = {404, 409}  # a rollback of an edit not applied (yet), a cancel of one already taken


def edit_request(rng: random.Random) -> dict[str, Any]:
    subject = rng.choice(SUBJECTS)
    template, targets = rng.choice(RELATIONS)
    target_new, target_true = rng.sample(targets, 2)
    return {"subject": subject, "prompt": template.format(subject), "target_new": target_new,
            "target_true": target_true}


@dataclass
class Accepted:
    """What the API accepted during a trial, and how it answered everything else."""

    edits: list[str] = field(default_factory=list)  # ids answered 202 by POST /edits
    rollbacks: list[tuple[str, int]] = field(default_factory=list)  # (edit id, rollback seq) answered 202
    cancels: list[str] = field(default_factory=list)  # ids answered 200 by DELETE /edits/{id}
    retries: list[tuple[list[str], list[str]]] = field(default_factory=list)  # ids of a POST and of its retry
    keyed: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (requester, Idempotency-Key, ids)
    statuses: Counter = field(default_factory=Counter)  # every answer's status code
    unavailable: int = 0  # 503 Unavailable with Retry-After while a store was down: the documented answer
    unexpected: list[str] = field(default_factory=list)  # answers that are neither acceptance nor a clear refusal

    @property
    def operations(self) -> int:
        return len(self.edits) + len(self.rollbacks)

    def add(self, other: "Accepted") -> None:
        """Take in what another workload (a concurrent one) saw."""
        self.edits += other.edits
        self.rollbacks += other.rollbacks
        self.cancels += other.cancels
        self.retries += other.retries
        self.keyed += other.keyed
        self.statuses.update(other.statuses)
        self.unavailable += other.unavailable
        self.unexpected += other.unexpected


def _documented_503(reply: httpx.Response) -> bool:
    """503 Unavailable with Retry-After: what the API answers while its ledger database is down."""
    try:
        kind = reply.json().get("error", {}).get("type")
    except ValueError:
        kind = None
    return reply.status_code == 503 and "retry-after" in reply.headers and kind == "Unavailable"


class Workload:
    """`outage`: a store is down meanwhile, so a 503 Unavailable with Retry-After is the right answer
    (counted in `accepted.unavailable`), and every POST /edits carries an Idempotency-Key so that what
    was refused can be sent again afterwards (retry_deferred), as a client honouring Retry-After would.
    `own_clients`: HTTP clients of its own, for a workload run in another thread."""

    def __init__(self, cluster: Cluster, rng: random.Random, *, outage: bool = False, own_clients: bool = False) -> None:
        self.cluster, self.rng = cluster, rng
        self.accepted = Accepted()
        self.outage = outage
        self.deferred: list[tuple[str, dict[str, Any], dict[str, str]]] = []  # POSTs answered 503, to send again
        self._clients: dict[str, httpx.Client] | None = {} if own_clients else None

    def client(self, who: str = "writer") -> httpx.Client:
        if self._clients is None:
            return self.cluster.client(who)
        if who not in self._clients:
            self._clients[who] = httpx.Client(base_url=self.cluster.api_url, timeout=60,
                                              headers={"Authorization": f"Bearer {getattr(self.cluster.keys, who)}"})
        return self._clients[who]

    def close(self) -> None:
        for client in (self._clients or {}).values():
            client.close()

    def _answer(self, what: str, reply: httpx.Response) -> dict[str, Any] | None:
        self.accepted.statuses[reply.status_code] += 1
        if reply.status_code in ACCEPTED_STATUSES:
            return reply.json()
        if self.outage and _documented_503(reply):
            self.accepted.unavailable += 1
        elif reply.status_code not in REFUSED_STATUSES:
            self.accepted.unexpected.append(f"{what}: {reply.status_code} {reply.text[:300]}")
        return None

    def _post_edits(self, what: str, body: dict[str, Any]) -> dict[str, Any] | None:
        headers = {"Idempotency-Key": uuid.uuid4().hex} if self.outage else {}
        reply = self.client().post("/edits", json=body, headers=headers)
        answer = self._answer(what, reply)
        if answer is None and headers and reply.status_code == 503:
            self.deferred.append((what, body, headers))
        return answer

    def retry_deferred(self) -> None:
        """Send every POST /edits refused with 503 again, with its Idempotency-Key: each must be accepted
        now, with the edits the ledger holds under that key (whether the first attempt wrote them or not)."""
        deferred, self.deferred, self.outage = self.deferred, [], False  # the store is back: no 503 now
        for what, body, headers in deferred:
            reply = self.client().post("/edits", json=body, headers=headers)
            answer = self._answer(f"{what}, sent again after a 503", reply)
            if answer is None:
                if reply.status_code in REFUSED_STATUSES:
                    self.accepted.unexpected.append(f"{what}, sent again after a 503: {reply.status_code} {reply.text[:300]}")
                continue
            ids = [e["id"] for e in answer["edits"]] if "edits" in answer else [answer["id"]]
            self.accepted.edits += ids
            self.accepted.keyed.append(("writer", headers["Idempotency-Key"], ids))

    def submit(self, count: int, *, rollbacks: int = 0) -> None:
        """`count` requests drawn from MIX, of which at least `rollbacks` rollbacks (when any edit is applied)."""
        kinds = [k for k in self.rng.choices(list(MIX), weights=list(MIX.values()), k=count)]
        kinds[:rollbacks] = ["rollback"] * min(rollbacks, count)
        self.rng.shuffle(kinds)
        for kind in kinds:
            getattr(self, kind)()

    def edit(self) -> None:
        body = self._post_edits("POST /edits", edit_request(self.rng))
        if body is not None:
            self.accepted.edits.append(body["id"])

    def edit_list(self) -> None:
        edits = [edit_request(self.rng) for _ in range(self.rng.randint(2, 4))]
        body = self._post_edits("POST /edits (list)", {"edits": edits})
        if body is not None:
            self.accepted.edits += [e["id"] for e in body["edits"]]

    def idempotent_retry(self) -> None:
        """A client that did not see the answer sends the same request again with the same key."""
        what = "POST /edits (Idempotency-Key)"
        body, headers = {"edits": [edit_request(self.rng)]}, {"Idempotency-Key": uuid.uuid4().hex}
        answers = [self._answer(what, self.client().post("/edits", json=body, headers=headers)) for _ in range(2)]
        first, again = ([e["id"] for e in a["edits"]] if a else [] for a in answers)
        if self.outage and None in answers:  # refused with 503 once or twice while a store was down
            if first or again:
                self.accepted.edits += first or again
                self.accepted.keyed.append(("writer", headers["Idempotency-Key"], first or again))
            else:
                self.deferred.append((what, body, headers))
            return
        self.accepted.edits += first
        self.accepted.retries.append((first, again))

    def rollback(self) -> None:
        applied = self._applied()
        if not applied:
            return self.edit()
        edit_id = self.rng.choice(applied)
        reply = self.client("admin").post(f"/edits/{edit_id}/rollback", json={"reason": "chaos trial"})
        body = self._answer("POST /edits/{id}/rollback", reply)
        if body is not None:
            self.accepted.rollbacks.append((edit_id, body["rollback_seq"]))

    def cancel(self) -> None:
        if not self.accepted.edits:
            return self.edit()
        edit_id = self.accepted.edits[-1]  # the newest: the likeliest to be still queued
        if self._answer("DELETE /edits/{id}", self.client().delete(f"/edits/{edit_id}")) is not None:
            self.accepted.cancels.append(edit_id)

    def _applied(self) -> list[str]:
        reply = self.client().get("/edits", params={"status": "applied", "limit": 100})
        return [e["id"] for e in reply.json()["items"]] if reply.status_code == 200 else []

    def ensure_applied(self, timeout_s: float = 120) -> None:
        """At least one applied edit exists (so that a rollback can be requested), waiting for one if needed."""
        if self._applied():
            return
        self.edit()
        wait_for(self._applied, "an edit applied", timeout_s, poll_s=0.2)
