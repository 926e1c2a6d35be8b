"""Continuous batching: one loop decodes every generation and scoring request of the worker, all
sequences in flight sharing its forward passes.

A step is one decode pass over the generating sequences (a token each), then one pass over the
prompts being prefilled, in chunks sized by what is left of the step's token budget, so a long
prompt never stalls the others for more than a chunk. A sequence whose prompt is done samples its
first token and joins the decoding batch; a finished or cancelled one leaves it between steps.
Requests are admitted in arrival order while the batch has room; beyond the queue bound they are
refused with Overloaded (429, Retry-After).

Model versions (architecture principle 9). The loop holds the editor's read lock while it has
sequences in flight and admits sequences only on the version it holds. A weight swap announces
itself on the editor's swap gate: admission stops, the old version's sequences finish, the loop
lets go, the swap goes in and the waiting sequences start on the new version. If the old
sequences need more than `swap_wait_s`, they are stopped then, never continued on the new
weights: those whose output nobody has seen (non-streamed requests, streams before their first
text, scores) start again from their prompt on the new version, seed and all; a stream that has
sent text ends with an Unavailable error event, to be retried.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import torch
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.editor import Editor
from service.errors import KnowpatchError, Overloaded, Unavailable
from workers.jobs import GenerationJob, Job, Row, ScoreJob
from workers.kv_batch import PaddedBatch

log = logging.getLogger(__name__)


class BatchLimits(BaseSettings):
    """The decoder's bounds, read from the environment (prefix KNOWPATCH_) when the worker starts."""

    model_config = SettingsConfigDict(env_prefix="KNOWPATCH_", env_file=".env", extra="ignore")

    generation_batch_size: int = Field(32, ge=1, description="most sequences in flight (decoding or prefilling)")
    generation_step_tokens: int = Field(
        256, ge=1, description="token budget of one step: one per decoding sequence, the rest for prompt chunks")
    generation_queue_limit: int = Field(
        64, ge=1, description="requests waiting for a slot beyond which new ones are refused (429)")
    swap_wait_s: float = Field(
        10.0, ge=0, description="longest a weight swap waits for the old version's sequences; then they are "
                                "restarted on the new version, or ended if they have streamed text")

    @model_validator(mode="after")
    def _budget_covers_the_batch(self) -> "BatchLimits":
        if self.generation_step_tokens < self.generation_batch_size:
            raise ValueError(f"KNOWPATCH_GENERATION_STEP_TOKENS ({self.generation_step_tokens}) must be at least "
                             f"KNOWPATCH_GENERATION_BATCH_SIZE ({self.generation_batch_size}): a step decodes one "
                             "token of every sequence")
        return self


class Batcher:
    """The decoding loop of one editor's model, on a thread of its own (started on first use)."""

    def __init__(self, editor: Editor, limits: BatchLimits) -> None:
        self.editor, self.limits = editor, limits
        self.base, self.head = editor.adapter.base, editor.adapter.head
        self.device = self.head.weight.device
        self.pad_id = editor.tokenizer.pad_token_id or 0  # fills holes, which nothing attends to
        self.steps = 0
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._decoding: list[Row] = []
        self._decode_batch: PaddedBatch | None = None
        self._prefilling: list[Row] = []
        self._prefill_batch: PaddedBatch | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- the requests' side ------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable("the worker's decoder is shut down")
            if len(self._waiting) >= self.limits.generation_queue_limit:
                raise Overloaded(f"{len(self._waiting)} requests already wait for a decoding slot "
                                 f"(KNOWPATCH_GENERATION_QUEUE_LIMIT); retry later")
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="knowpatch-decoder", daemon=True)
                self._thread.start()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away (or the job is done): its rows leave the batch at the next step."""
        job.cancelled = True
        with self._cond:
            if job.version is None and job in self._waiting:
                self._waiting.remove(job)

    def stats(self) -> dict[str, Any]:
        return {"decoding": len(self._decoding), "prefilling": len(self._prefilling), "waiting": len(self._waiting),
                "steps": self.steps, "batch_size": self.limits.generation_batch_size,
                "step_tokens": self.limits.generation_step_tokens,
                "queue_limit": self.limits.generation_queue_limit}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.put(Unavailable("the worker's decoder shut down before this request started"))

    # ---- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting:
                    self._cond.wait()
                if self._closed:
                    return
            self.editor.swap_gate.wait_clear()  # a swap announced now goes first
            try:
                with torch.no_grad(), self.editor.reading() as version:
                    self._epoch(version)
            except Exception:  # the loop outlives any failure; the requests in flight get it
                log.exception("decoding failed; failing the %d requests in flight", len(self._jobs_in_flight()))
                self._stop_all(lambda job: job.put(KnowpatchError(
                    "internal error while decoding; the worker's log has the details")))

    def _epoch(self, version: int) -> None:
        """Steps on one model version until nothing is in flight, or a swap waited too long."""
        while not self._closed:
            waited = self.editor.swap_gate.waited()
            self._admit(version, draining=waited is not None)
            self._drop_cancelled()
            if not self._decoding and not self._prefilling:
                return
            if waited is not None and waited > self.limits.swap_wait_s:
                self._preempt(version, waited)
                return
            self._step()

    def _admit(self, version: int, draining: bool) -> None:
        """Waiting rows into the prefill batch, in arrival order, while there is room. While a swap
        waits only the rest of a job already started (a score request's other candidates) comes in."""
        fresh: list[Row] = []
        with self._cond:
            room = self.limits.generation_batch_size - len(self._decoding) - len(self._prefilling)
            while self._waiting and room > 0:
                job = self._waiting[0]
                if job.cancelled:  # a score request partly admitted when its client left
                    self._waiting.popleft()
                    continue
                if draining and job.version is None:
                    break
                job.version = version
                taken, job.pending = job.pending[:room], job.pending[room:]
                fresh += taken
                room -= len(taken)
                if not job.pending:
                    self._waiting.popleft()
        if fresh:
            self._prefilling += fresh
            self._prefill_batch = PaddedBatch.concat(self._prefill_batch, PaddedBatch.fresh(len(fresh), self.device))

    def _drop_cancelled(self) -> None:
        self._keep_decoding([i for i, row in enumerate(self._decoding) if not row.job.cancelled])
        self._keep_prefilling([i for i, row in enumerate(self._prefilling) if not row.job.cancelled])

    def _keep_decoding(self, keep: list[int]) -> None:
        if len(keep) < len(self._decoding):
            self._decoding = [self._decoding[i] for i in keep]
            self._decode_batch = self._decode_batch.select(keep) if keep and self._decode_batch else None

    def _keep_prefilling(self, keep: list[int]) -> None:
        if len(keep) < len(self._prefilling):
            self._prefilling = [self._prefilling[i] for i in keep]
            self._prefill_batch = self._prefill_batch.select(keep) if keep and self._prefill_batch else None

    def _step(self) -> None:
        budget = self.limits.generation_step_tokens
        if self._decoding:
            budget -= len(self._decoding)
            self._decode()
        if self._prefilling:
            self._prefill(max(1, budget))
        self.steps += 1

    def _decode(self) -> None:
        """One token for every decoding sequence."""
        assert self._decode_batch is not None
        ids = torch.tensor([[row.next_input] for row in self._decoding], device=self.device)  # (B, 1)
        hidden = self._decode_batch.forward(self.base, ids, torch.ones_like(ids))  # (B, 1, H)
        logits = self.head(hidden[:, -1]).float().cpu()  # (B, V)
        self._keep_decoding([i for i, row in enumerate(self._decoding)
                             if not _generation(row).advance(row, logits[i])])

    def _prefill(self, budget: int) -> None:
        """The next chunk of every prefilling row's tokens, at most `budget` positions in all (holes included)."""
        assert self._prefill_batch is not None
        rows = self._prefilling
        left = [len(row.feed) - row.fed for row in rows]
        width = max(1, min(max(left), budget // len(rows)))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        chunks = []  # (first position, length) fed per row
        for i, row in enumerate(rows):
            n = min(width, left[i])
            ids[i, width - n:] = torch.tensor(row.feed[row.fed:row.fed + n])
            mask[i, width - n:] = 1
            chunks.append((row.fed, n))
            row.fed += n
        hidden = self._prefill_batch.forward(self.base, ids.to(self.device), mask.to(self.device))  # (B, W, H)
        self._score_chunk(rows, chunks, hidden)
        self._finish_prefill(rows, hidden)

    def _score_chunk(self, rows: list[Row], chunks: list[tuple[int, int]], hidden: torch.Tensor) -> None:
        """Log-probabilities of the score rows' targets predicted within this chunk."""
        width = hidden.shape[1]
        picks: list[tuple[int, int, int, Row]] = []  # (row index, column, target id, row)
        for i, (row, (start, n)) in enumerate(zip(rows, chunks)):
            first = len(row.feed) - len(row.targets)  # position predicting the first target
            for position in range(max(start, first), start + n) if row.targets else ():
                picks.append((i, width - n + position - start, row.targets[position - first], row))
        if not picks:
            return
        index = torch.tensor([(i, column) for i, column, _, _ in picks], device=self.device)
        logprobs = torch.log_softmax(self.head(hidden[index[:, 0], index[:, 1]]).float(), dim=-1)
        targets = torch.tensor([target for _, _, target, _ in picks], device=self.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].double().cpu()
        for (_, _, _, row), value in zip(picks, chosen.tolist()):
            _score(row).add(row.candidate, value)

    def _finish_prefill(self, rows: list[Row], hidden: torch.Tensor) -> None:
        """Rows whose prompt is done: score rows are complete; generation rows choose their first
        token and join the decoding batch unless that already ends them."""
        assert self._prefill_batch is not None
        done = [i for i, row in enumerate(rows) if row.fed == len(row.feed)]
        if not done:
            return
        generating = [i for i in done if not rows[i].targets]
        moving = []
        if generating:
            logits = self.head(hidden[generating, -1]).float().cpu()  # (G, V): the last column is real
            moving = [i for i, first in zip(generating, logits) if not _generation(rows[i]).advance(rows[i], first)]
        for i in done:
            if rows[i].targets:
                _score(rows[i]).row_done()
        if moving:
            self._decode_batch = PaddedBatch.concat(self._decode_batch, self._prefill_batch.select(moving))
            self._decoding += [rows[i] for i in moving]
        finished = set(done)
        self._keep_prefilling([i for i in range(len(rows)) if i not in finished])

    # ---- stopping what is in flight -------------------------------------------------------------

    def _jobs_in_flight(self) -> list[Job]:
        """Jobs with rows in the batch or partly admitted, in admission order."""
        jobs: dict[int, Job] = {}
        for row in self._decoding + self._prefilling:
            jobs.setdefault(id(row.job), row.job)
        with self._cond:
            if self._waiting and self._waiting[0].version is not None:
                jobs.setdefault(id(self._waiting[0]), self._waiting[0])
        return list(jobs.values())

    def _stop_all(self, handle: Any) -> list[Job]:
        """Empty the batch; `handle(job)` for each job that was in flight; returns them."""
        jobs = [job for job in self._jobs_in_flight() if not job.cancelled]
        self._decoding, self._prefilling = [], []
        self._decode_batch = self._prefill_batch = None
        with self._cond:
            if self._waiting and self._waiting[0].version is not None:
                self._waiting.popleft()
        for job in jobs:
            handle(job)
        return jobs

    def _preempt(self, version: int, waited: float) -> None:
        """A swap waited past the bound: restart what nobody has seen yet, end the streams that have
        sent text. Nothing continues on the new version."""
        restart: list[Job] = []

        def handle(job: Job) -> None:
            if job.sent:
                job.put(Unavailable(
                    f"generation on model version {version} was interrupted by a model update that waited "
                    f"{waited:.1f} s for it (KNOWPATCH_SWAP_WAIT_S); retry"))
            else:
                job.reset()
                restart.append(job)

        stopped = self._stop_all(handle)
        with self._cond:
            self._waiting.extendleft(reversed(restart))
        log.warning("a weight swap waited %.1f s: %d requests on version %d restart on the next version, %d "
                    "streams ended", waited, len(restart), version, len(stopped) - len(restart))


def _generation(row: Row) -> GenerationJob:
    assert isinstance(row.job, GenerationJob)
    return row.job


def _score(row: Row) -> ScoreJob:
    assert isinstance(row.job, ScoreJob)
    return row.job
