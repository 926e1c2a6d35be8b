"""The continuous-batching decoder (workers/batching.py through workers.inference.LocalBackend) on a
real Editor over the tiny random Llama: batched output equals each sequence decoded alone, scores
equal the editor's, every sequence is decoded on one model version while edits land, a swap that
waits past its bound restarts what nobody has seen and ends the streams that have sent text, the
queue is bounded, a long prompt is prefilled in chunks while others keep decoding."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch

from service.engine.editor import Editor
from service.engine.factors import EditFactors, LayerFactor, on_grid
from service.engine.types import HyperParams
from service.errors import Overloaded, Unavailable
from service.inference import GenerateParams, GenerateResult, StreamEvent
from service.model.loading import load_model
from tests.engine.conftest import CACHE_DIR, tiny_model, wikitext_moments
from workers.batching import BatchLimits
from workers.generation import generate_text
from workers.inference import LocalBackend

PROMPTS = ["The Eiffel Tower is located in the city of", "hello", "Once upon a time, in a small village by the sea,",
           "A list of prime numbers: 2, 3, 5, 7,", "The river", "Dear committee, I am writing to apply for " * 4]


@pytest.fixture(scope="module")
def editor() -> Iterator[Editor]:
    """A real Editor (AlphaEdit, layers 1-3) on the tiny Llama, at version 0 with no edit after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny; a busy machine's spinning thread pool only slows it
    loaded = tiny_model("llama", load_model("smollm2", cache_dir=CACHE_DIR).tokenizer)
    hparams = HyperParams(layers=(1, 2, 3), stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)
    built = Editor(loaded, hparams, wikitext_moments(loaded, hparams), templates=["{}"])
    yield built
    built.close()
    torch.set_num_threads(threads)


@pytest.fixture
def fresh(editor: Editor) -> Iterator[Editor]:
    yield editor
    editor.clear()


def synthetic_edit(editor: Editor, edit_id: str, seed: int, scale: float = 0.5) -> EditFactors:
    """Random rank-one factors of the edited layers' shapes: a weight change as a real edit makes one."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer in editor.layers:
        d_out, d_in = editor.adapter.weight(layer).shape
        r, a = on_grid(torch.randn(d_out, generator=g) * scale, torch.randn(d_in, generator=g) * scale)
        layers[layer] = LayerFactor(r, a, torch.randn(d_in, generator=g))
    return EditFactors(edit_id, "synthetic", layers)


def alone(editor: Editor, params: GenerateParams) -> tuple[str, str, int, int]:
    return generate_text(editor.model, editor.tokenizer, params)


def as_tuple(result: GenerateResult) -> tuple[str, str, int, int]:
    return result.generated_text, result.finish_reason, result.generated_tokens, result.prompt_tokens


async def stream_text(backend: LocalBackend, params: GenerateParams,
                      started: asyncio.Event | None = None) -> tuple[str, GenerateResult]:
    """The streamed text and the final result; `started` is set at the first event."""
    text = ""
    async for event in backend.generate_stream(params):
        if started is not None:
            started.set()
        if event.result is not None:
            return text, event.result
        text += event.text
    raise AssertionError("the stream ended without a result")


async def until(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.005)


def test_batched_sequences_equal_each_decoded_alone(editor: Editor) -> None:
    """Prompts of different lengths prefilled in small chunks (holes in the padded cache), sequences
    joining and leaving a batch of 3, greedy and seeded sampling, stop sequences and EOS."""
    params = [GenerateParams(p, max_new_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    params += [GenerateParams(PROMPTS[0], max_new_tokens=12, do_sample=True, temperature=1.3, seed=s) for s in (1, 2)]
    params += [GenerateParams(PROMPTS[2], max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, seed=7),
               GenerateParams("weight", max_new_tokens=8)]  # the tiny model's next token is EOS here
    expected = [alone(editor, p) for p in params]
    stop = expected[2][0].split()[2]
    params.append(GenerateParams(PROMPTS[2], max_new_tokens=16, stop=(stop,)))
    expected.append(alone(editor, params[-1]))
    assert expected[-1][1] == "stop" and expected[-2][1] == "eos"
    backend = LocalBackend(editor, limits=BatchLimits(generation_batch_size=3, generation_step_tokens=12))

    async def run() -> list[GenerateResult]:
        return await asyncio.gather(*(backend.generate(p) for p in params))

    try:
        results = asyncio.run(run())
        streamed = asyncio.run(stream_text(backend, params[0]))
    finally:
        backend.close()
    assert [as_tuple(r) for r in results] == expected
    assert all(r.model_version == 0 for r in results)
    assert streamed == (expected[0][0], results[0])
    assert backend.batcher.steps > max(p.max_new_tokens for p in params)  # it did run several sequences per step


def test_scores_batched_and_chunked_equal_the_editors(editor: Editor) -> None:
    prompt = "The Eiffel Tower is located in the city of"
    candidates = [[" Paris", " Rome and Milan"], [" the city of light by the river" * 6, "x"], [" Berlin"]]
    backend = LocalBackend(editor, limits=BatchLimits(generation_batch_size=4, generation_step_tokens=16))

    async def run():
        return await asyncio.gather(*(backend.score(prompt, c) for c in candidates),
                                    backend.generate(GenerateParams(prompt, max_new_tokens=20)))

    try:
        *scores, generated = asyncio.run(run())
    finally:
        backend.close()
    for result, cands in zip(scores, candidates):
        reference = editor.score(prompt, cands)
        assert [s.candidate for s in result.scores] == cands and result.model_version == 0
        for got, want in zip(result.scores, reference):
            assert got.tokens == want.tokens and got.total_logprob == pytest.approx(want.total_logprob, abs=1e-4)
    assert as_tuple(generated) == alone(editor, GenerateParams(prompt, max_new_tokens=20))


def test_streams_while_edits_land_each_decoded_on_one_version(fresh: Editor) -> None:
    """Greedy streams in flight when an edit is installed finish on the old version (the swap waits
    for them); requests sent while the swap waits start on the new one. Every answer equals what
    its reported version's weights produce alone."""
    editor = fresh
    params = [GenerateParams(p, max_new_tokens=24) for p in PROMPTS[:3]]
    edits = [synthetic_edit(editor, "e1", 1), synthetic_edit(editor, "e2", 2)]
    expected = {0: [alone(editor, p) for p in params]}
    for version, edit in enumerate(edits, start=1):
        editor.load([edit], version)
        expected[version] = [alone(editor, p) for p in params]
    editor.clear()
    assert expected[0] != expected[1] != expected[2], "the synthetic edits must change the greedy answers"
    swaps_before = editor.swap_gate.summary()["swaps"]
    backend = LocalBackend(editor)

    async def round_of_streams() -> tuple[list[asyncio.Task], list[asyncio.Event]]:
        started = [asyncio.Event() for _ in params]
        tasks = [asyncio.create_task(stream_text(backend, p, s)) for p, s in zip(params, started)]
        for s in started:
            await s.wait()
        return tasks, started

    async def scenario() -> list[list[tuple[str, GenerateResult]]]:
        rounds = []
        tasks, _ = await round_of_streams()  # in flight on version 0
        rounds.append(tasks)
        for version, edit in enumerate(edits, start=1):
            swap = asyncio.create_task(asyncio.to_thread(editor.load, [edit], version))
            await until(lambda: editor.swap_gate.waited() is not None or swap.done(), "the swap is announced")
            tasks, _ = await round_of_streams()  # sent while the swap waits (or just after it)
            rounds.append(tasks)
            await swap
        return [[await t for t in tasks] for tasks in rounds]

    try:
        rounds = asyncio.run(scenario())
    finally:
        backend.close()
    for round_number, answers in enumerate(rounds):
        for (text, result), p in zip(answers, params):
            version = result.model_version
            assert as_tuple(result) == expected[version][params.index(p)], (round_number, version, p.inputs)
            assert text == result.generated_text
        assert {result.model_version for _, result in answers} == {round_number}
    summary = editor.swap_gate.summary()
    assert summary["swaps"] - swaps_before == 2 and summary["max_s"] > 0


def test_a_swap_waiting_past_its_bound_restarts_what_nobody_saw_and_ends_streams(fresh: Editor) -> None:
    editor = fresh
    params = GenerateParams(PROMPTS[2], max_new_tokens=150)
    edit = synthetic_edit(editor, "e1", 1)
    editor.load([edit], 1)
    on_new_version = alone(editor, params)
    editor.clear()
    assert on_new_version[1] == "length"
    backend = LocalBackend(editor, limits=BatchLimits(swap_wait_s=0))

    async def scenario() -> tuple[BaseException | tuple, GenerateResult]:
        started = asyncio.Event()
        streamed = asyncio.create_task(stream_text(backend, params, started))
        whole = asyncio.create_task(backend.generate(params))
        await started.wait()
        await until(lambda: backend.batcher.stats()["decoding"] == 2, "both sequences decode")
        await asyncio.to_thread(editor.load, [edit], 1)
        outcome = await asyncio.gather(streamed, return_exceptions=True)
        return outcome[0], await whole

    try:
        stream_outcome, result = asyncio.run(scenario())
    finally:
        backend.close()
    assert isinstance(stream_outcome, Unavailable), stream_outcome
    assert "interrupted by a model update" in stream_outcome.message and "KNOWPATCH_SWAP_WAIT_S" in \
        stream_outcome.message
    assert result.model_version == 1 and as_tuple(result) == on_new_version  # started again, on version 1


def test_the_queue_is_bounded(editor: Editor) -> None:
    backend = LocalBackend(editor, limits=BatchLimits(generation_batch_size=1, generation_queue_limit=1))
    long = GenerateParams(PROMPTS[2], max_new_tokens=300)

    async def scenario() -> None:
        first = asyncio.create_task(backend.generate(long))
        await until(lambda: backend.batcher.stats()["decoding"] == 1, "the first request decodes")
        second = asyncio.create_task(backend.generate(long))
        await until(lambda: backend.batcher.stats()["waiting"] == 1, "the second request waits")
        with pytest.raises(Overloaded, match="KNOWPATCH_GENERATION_QUEUE_LIMIT"):
            await backend.generate(long)
        with pytest.raises(Overloaded):
            await backend.score("x", ["a"])
        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        await until(lambda: not any(backend.batcher.stats()[k] for k in ("decoding", "prefilling", "waiting")),
                    "the cancelled requests leave")
        assert (await backend.generate(GenerateParams("x", max_new_tokens=2))).generated_tokens <= 2

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    assert Overloaded.status == 429 and issubclass(Overloaded, Unavailable)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(editor: Editor) -> None:
    budget = 32
    backend = LocalBackend(editor, limits=BatchLimits(generation_step_tokens=budget))
    long_prompt = "The river flows past the old mill and the church. " * 40
    prompt_tokens = len(editor.tokenizer(long_prompt)["input_ids"])
    assert prompt_tokens > 10 * budget
    arrivals: list[tuple[str, float]] = []

    async def watch(name: str, params: GenerateParams) -> None:
        async for event in backend.generate_stream(params):
            arrivals.append((name, time.monotonic()))
            if event.result is not None:
                return

    async def scenario() -> None:
        short = asyncio.create_task(watch("short", GenerateParams(PROMPTS[2], max_new_tokens=60)))
        await until(lambda: len(arrivals) >= 3, "the short request decodes")
        await watch("long", GenerateParams(long_prompt, max_new_tokens=1))
        await short

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    long_at = next(t for name, t in arrivals if name == "long")
    short_before = sum(1 for name, t in arrivals if name == "short" and t <= long_at)
    # The prompt needs prompt_tokens / (budget - 1) steps; the short sequence gets a token in each.
    assert short_before >= prompt_tokens // budget, (short_before, prompt_tokens)


def test_info_reports_the_decoder_and_the_swap_waits(fresh: Editor) -> None:
    backend = LocalBackend(fresh, limits=BatchLimits(swap_wait_s=3))
    fresh.load([], 1)
    details = asyncio.run(backend.info()).details
    backend.close()
    assert details["decoder"] | {"steps": 0} == {"decoding": 0, "prefilling": 0, "waiting": 0, "steps": 0,
                                                 "batch_size": 32, "step_tokens": 256, "queue_limit": 64}
    assert details["swap_wait"]["bound_s"] == 3 and details["swap_wait"]["swaps"] >= 1
    assert details["swap_wait"]["max_s"] >= details["swap_wait"]["p50_s"] >= 0


def test_limits_must_let_a_step_decode_every_sequence() -> None:
    with pytest.raises(ValueError, match="must be at least KNOWPATCH_GENERATION_BATCH_SIZE"):
        BatchLimits(generation_batch_size=64, generation_step_tokens=32)


def test_stream_events_are_only_text_then_the_result(editor: Editor) -> None:
    backend = LocalBackend(editor)

    async def events() -> list[StreamEvent]:
        return [e async for e in backend.generate_stream(GenerateParams(PROMPTS[0], max_new_tokens=5))]

    try:
        got = asyncio.run(events())
    finally:
        backend.close()
    assert all(e.text and e.result is None for e in got[:-1]) and got[-1].result is not None
