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
    statuses: Counter = field(default_factory=Counter)  # every answer's status code
    unexpected: list[str] = field(default_factory=list)  # answers that are neither acceptance nor a clear refusal

    @property
    def operations(self) -> int:
        return len(self.edits) + len(self.rollbacks)


class Workload:
    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster, self.rng = cluster, rng
        self.accepted = Accepted()

    def _answer(self, what: str, reply: httpx.Response) -> dict[str, Any] | None:
        self.accepted.statuses[reply.status_code] += 1
        if reply.status_code in ACCEPTED_STATUSES:
            return reply.json()
        if reply.status_code not in REFUSED_STATUSES:
            self.accepted.unexpected.append(f"{what}: {reply.status_code} {reply.text[:300]}")
        return None

    def submit(self, count: int, *, rollbacks: int = 0) -> None:
        """`count` requests drawn from MIX, of which at least `rollbacks` rollbacks (when any edit is applied)."""
        kinds = [k for k in self.rng.choices(list(MIX), weights=list(MIX.values()), k=count)]
        kinds[:rollbacks] = ["rollback"] * min(rollbacks, count)
        self.rng.shuffle(kinds)
        for kind in kinds:
            getattr(self, kind)()

    def edit(self) -> None:
        body = self._answer("POST /edits", self.cluster.client().post("/edits", json=edit_request(self.rng)))
        if body is not None:
            self.accepted.edits.append(body["id"])

    def edit_list(self) -> None:
        edits = [edit_request(self.rng) for _ in range(self.rng.randint(2, 4))]
        body = self._answer("POST /edits (list)", self.cluster.client().post("/edits", json={"edits": edits}))
        if body is not None:
            self.accepted.edits += [e["id"] for e in body["edits"]]

    def idempotent_retry(self) -> None:
        """A client that did not see the answer sends the same request again with the same key."""
        body, headers = {"edits": [edit_request(self.rng)]}, {"Idempotency-Key": uuid.uuid4().hex}
        answers = [self._answer("POST /edits (Idempotency-Key)",
                                self.cluster.client().post("/edits", json=body, headers=headers)) for _ in range(2)]
        first, again = ([e["id"] for e in a["edits"]] if a else [] for a in answers)
        self.accepted.edits += first
        self.accepted.retries.append((first, again))

    def rollback(self) -> None:
        applied = self._applied()
        if not applied:
            return self.edit()
        edit_id = self.rng.choice(applied)
        reply = self.cluster.client("admin").post(f"/edits/{edit_id}/rollback", json={"reason": "chaos trial"})
        body = self._answer("POST /edits/{id}/rollback", reply)
        if body is not None:
            self.accepted.rollbacks.append((edit_id, body["rollback_seq"]))

    def cancel(self) -> None:
        if not self.accepted.edits:
            return self.edit()
        edit_id = self.accepted.edits[-1]  # the newest: the likeliest to be still queued
        if self._answer("DELETE /edits/{id}", self.cluster.client().delete(f"/edits/{edit_id}")) is not None:
            self.accepted.cancels.append(edit_id)

    def _applied(self) -> list[str]:
        reply = self.cluster.client().get("/edits", params={"status": "applied", "limit": 100})
        return [e["id"] for e in reply.json()["items"]] if reply.status_code == 200 else []

    def ensure_applied(self, timeout_s: float = 120) -> None:
        """At least one applied edit exists (so that a rollback can be requested), waiting for one if needed."""
        if self._applied():
            return
        self.edit()
        wait_for(self._applied, "an edit applied", timeout_s, poll_s=0.2)
