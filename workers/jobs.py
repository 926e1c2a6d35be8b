"""What the decoding loop (workers/batching.py) works on: a request as a job, its sequences as rows,
and the hand-over of its events to the request's event loop."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Union

import torch
from transformers import PreTrainedTokenizerBase

from service.engine.prompts import Row as ScoreRowSpec
from service.errors import KnowpatchError
from service.inference import CandidateScore, GenerateParams, GenerateResult, ScoreResult, StreamEvent
from workers.generation import TextTracker, next_token, request_generator


Event = Union[StreamEvent, ScoreResult, KnowpatchError]


class AsyncSink:
    """Hands a job's events from the decoding thread to the event loop that asked for them."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, item: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> Event:
        return await self.queue.get()


@dataclass(eq=False)
class Row:
    """One sequence in the batch: a generation, or one candidate of a score request."""

    job: "Job"
    feed: tuple[int, ...]  # the tokens to prefill
    fed: int = 0  # how many of them are in the cache
    candidate: int = 0  # score rows: the candidate's index
    targets: tuple[int, ...] = ()  # score rows: the candidate's tokens, predicted by the last len(targets) positions
    next_input: int = -1  # generation rows, once decoding: the token to feed next


@dataclass(eq=False)
class Job:
    """One request: its rows not admitted yet, the version it is served at, where its events go."""

    sink: AsyncSink
    streaming: bool = False
    version: int | None = None  # set when its first row is admitted
    pending: list[Row] = field(default_factory=list)
    cancelled: bool = False
    sent: bool = False  # text went out to the client: it cannot start again
    done: bool = False

    def put(self, item: Event) -> None:
        if self.done:
            return
        self.done = not isinstance(item, StreamEvent) or item.result is not None
        try:
            self.sink.put(item)
        except RuntimeError:  # the request's event loop is gone: nobody listens any more
            self.cancelled = True

    def reset(self) -> None:
        """Back to not admitted, nothing computed."""
        raise NotImplementedError


class GenerationJob(Job):
    def __init__(self, sink: AsyncSink, params: GenerateParams, prompt: list[int], tokenizer: PreTrainedTokenizerBase,
                 streaming: bool) -> None:
        super().__init__(sink, streaming)
        self.params, self.prompt, self.tokenizer = params, prompt, tokenizer
        self.reset()

    def reset(self) -> None:
        self.version = None
        self.generator = request_generator(self.params)
        self.tracker = TextTracker(self.tokenizer, self.params)
        self.pending = [Row(self, tuple(self.prompt))]

    def advance(self, row: Row, logits: torch.Tensor) -> bool:
        """Choose the next token from logits (V,); True when the sequence is finished."""
        step = self.tracker.push(next_token(logits, self.params, self.generator))
        if step.text and self.streaming:
            self.put(StreamEvent(step.text))
            self.sent = True
        if step.finish_reason:
            assert self.version is not None
            self.put(StreamEvent("", GenerateResult(self.tracker.text, step.finish_reason, step.tokens,
                                                    len(self.prompt), self.version)))
            return True
        row.next_input = self.tracker.generated[-1]
        return False


class ScoreJob(Job):
    def __init__(self, sink: AsyncSink, candidates: list[str], specs: list[ScoreRowSpec]) -> None:
        super().__init__(sink)
        self.candidates, self.specs = candidates, specs
        self.reset()

    def reset(self) -> None:
        self.version = None
        self.pending = [Row(self, spec.ids, candidate=i, targets=spec.targets) for i, spec in enumerate(self.specs)]
        self.totals = [0.0] * len(self.specs)
        self.left = len(self.specs)

    def add(self, candidate: int, logprob: float) -> None:
        self.totals[candidate] += logprob

    def row_done(self) -> None:
        self.left -= 1
        if self.left == 0:
            assert self.version is not None
            scores = [CandidateScore(c, total, total / len(s.targets), len(s.targets))
                      for c, total, s in zip(self.candidates, self.totals, self.specs)]
            self.put(ScoreResult(scores, self.version))
