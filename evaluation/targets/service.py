"""The service target: drives a running knowpatch service through its public HTTP API only.

POST /edits (list form) per batch, poll GET /edits/{id} until every edit is applied or failed,
then read with POST /score and POST /generate at `min_model_version` = the version the batch
produced, so every read sees the batch. /score gives log-probabilities but no argmax: top-1
numbers come out None over HTTP.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from service.engine.types import EditRequest
from service.errors import KnowpatchError, Unavailable, error_from_reply
from evaluation.targets import BatchOutcome, Query, QueryScore

log = logging.getLogger(__name__)

TERMINAL = {"applied", "failed", "rolled_back", "cancelled"}


def _request_body(request: EditRequest, method: str | None, batch_id: str) -> dict[str, Any]:
    body = {k: v for k, v in request.to_dict().items() if v not in (None, [], ())}
    if method:
        body["method"] = method
    body["metadata"] = {"source": "knowpatch-eval", "batch": batch_id}
    return body


def _edit_ids(payload: Any) -> list[str]:
    """Ids from the 202 body: a list of edits, {"edits": [...]}, or one edit."""
    items = payload.get("edits", [payload]) if isinstance(payload, dict) else payload
    return [str(item["id"]) for item in items]


class ServiceTarget:
    kind = "http"

    def __init__(self, url: str, api_key: str | None = None, *, method: str | None = None, timeout_s: float = 120.0,
                 poll_interval_s: float = 0.5, edit_timeout_s: float = 3600.0, concurrency: int = 4,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport)
        self.url = url
        self.method = method
        self.poll_interval_s = poll_interval_s
        self.edit_timeout_s = edit_timeout_s
        self.concurrency = concurrency
        self.min_version: int | None = None  # the version that contains every batch applied so far

    # ---- transport ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unavailable(f"{method} {self.url}{path} failed: {exc}") from exc
        if response.is_success:
            return response.json()
        raise error_from_reply(response.status_code, response.content, f"{method} {self.url}{path}")

    def _map(self, fn, items: Sequence) -> list:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    # ---- editing -----------------------------------------------------------------------------

    def apply(self, requests: Sequence[EditRequest], batch_id: str) -> BatchOutcome:
        start = time.perf_counter()
        edits = [_request_body(r, self.method, batch_id) for r in requests]
        payload = self._call("POST", "/edits", json={"edits": edits})
        ids = _edit_ids(payload)
        submitted = time.perf_counter()
        records = self._wait(ids)
        timings = {"submit_s": submitted - start, "wait_s": time.perf_counter() - submitted}
        versions = [r["model_version"] for r in records if r.get("model_version") is not None]
        if versions:
            self.min_version = max([self.min_version or 0, *versions])
        failed = [f"{i}: {r.get('status')}: {r.get('error')}"
                  for i, r in zip(ids, records) if r.get("status") != "applied"]
        error = "; ".join(failed) or None
        if error:
            log.warning("batch %s: %d of %d edits not applied: %s", batch_id, len(failed), len(ids), error)
        return BatchOutcome(len(requests), not failed, error, self.min_version, timings)

    def _wait(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Poll until every edit reaches a terminal status (the worker applies them in order)."""
        deadline = time.monotonic() + self.edit_timeout_s
        records: dict[str, dict[str, Any]] = {}
        while len(records) < len(ids):
            for edit_id in ids:
                if edit_id not in records:
                    record = self._call("GET", f"/edits/{edit_id}")
                    if record.get("status") in TERMINAL:
                        records[edit_id] = record
            if len(records) < len(ids):
                if time.monotonic() > deadline:
                    missing = sorted(set(ids) - set(records))
                    raise Unavailable(f"edits {missing} not finished after {self.edit_timeout_s} s")
                time.sleep(self.poll_interval_s)
        return [records[i] for i in ids]

    # ---- reading -----------------------------------------------------------------------------

    def _at_version(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ask for the version that holds every applied batch (read-your-writes)."""
        return body if self.min_version is None else {**body, "min_model_version": self.min_version}

    def _score_prompt(self, item: tuple[str, list[str]]) -> list[QueryScore]:
        prompt, candidates = item
        body = self._at_version({"prompt": prompt, "candidates": candidates})
        scores = self._call("POST", "/score", json=body)["scores"]
        if [s["candidate"] for s in scores] != candidates:
            raise Unavailable(f"/score answered other candidates than asked for prompt {prompt!r}")
        return [QueryScore(s["total_logprob"], s["tokens"], None) for s in scores]

    def score(self, queries: Sequence[Query]) -> list[QueryScore]:
        """One /score call per distinct prompt, with all its candidates."""
        grouped: dict[str, list[str]] = {}
        for q in queries:
            candidates = grouped.setdefault(q.prompt, [])
            if q.continuation not in candidates:
                candidates.append(q.continuation)
        answers = dict(zip(grouped, self._map(self._score_prompt, list(grouped.items()))))
        return [answers[q.prompt][grouped[q.prompt].index(q.continuation)] for q in queries]

    def token_accuracy(self, queries: Sequence[Query]) -> list[float | None]:
        return [None] * len(queries)

    def _generate_one(self, prompt: str, max_new_tokens: int) -> str:
        parameters = {"max_new_tokens": max_new_tokens, "do_sample": False}
        body = self._at_version({"inputs": prompt, "parameters": parameters})
        return self._call("POST", "/generate", json=body)["generated_text"]

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return self._map(lambda p: self._generate_one(p, max_new_tokens), prompts)

    def describe(self) -> dict[str, Any]:
        try:
            info = self._call("GET", "/info")
        except KnowpatchError as exc:
            log.warning("GET /info failed: %s", exc.message)
            info = {}
        return {"backend": self.kind, "url": self.url, "service_info": info}

    def close(self) -> None:
        self.client.close()
