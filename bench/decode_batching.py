"""The continuous-batching decoder in process, without HTTP: its cost for one request against the
plain one-sequence loop the worker used before (workers.generation.generate_text, under the read
lock), interleaved pair by pair so that other load on the machine hits both alike; and tokens/s
with 1, 8 and 32 concurrent requests. SmolLM2-135M, greedy, 32 new tokens, the fixed prompts of
bench/service_load.py. Prints a table; the last line is one JSON object.

    .venv/bin/python bench/decode_batching.py [--pairs 12] [--rounds 2] [--threads N]

The editor is built as `knowpatch serve` builds it (WikiText-2 corpus, 20k statistics tokens, so the
statistics cached by bench/service_load.py are reused).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.service_load import CORPUS, MAX_NEW_TOKENS, PROMPTS  # noqa: E402
from service.bootstrap import build_editor  # noqa: E402
from service.config import Settings  # noqa: E402
from service.inference import GenerateParams  # noqa: E402
from workers.generation import generate_text  # noqa: E402
from workers.inference import LocalBackend  # noqa: E402


def plain(backend: LocalBackend, params: GenerateParams) -> int:
    """The worker's path before batching: one sequence alone, holding the read lock."""
    editor = backend.editor
    with editor.reading():
        return generate_text(editor.model, editor.tokenizer, params)[2]


async def batched(backend: LocalBackend, params: list[GenerateParams]) -> int:
    return sum(r.generated_tokens for r in await asyncio.gather(*(backend.generate(p) for p in params)))


def timed(call) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = call()
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12, help="interleaved one-request pairs (plain, batched)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 1/8/32 concurrent requests")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own; 1 is steadier on a machine shared with other work)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = [GenerateParams(p, max_new_tokens=MAX_NEW_TOKENS) for p in PROMPTS]
    editor = build_editor(Settings(corpus=str(CORPUS), stats_tokens=20000), progress=False)
    backend = LocalBackend(editor)
    load = [os.getloadavg()[0]]
    plain(backend, params[0])  # warm-up, not counted
    asyncio.run(batched(backend, params[:1]))
    pairs: list[tuple[float, float]] = []
    for i in range(args.pairs):
        p = params[i % len(params)]
        if i % 2 == 0:  # alternate which goes first
            old = timed(lambda: plain(backend, p))[0]
            new = timed(lambda: asyncio.run(batched(backend, [p])))[0]
        else:
            new = timed(lambda: asyncio.run(batched(backend, [p])))[0]
            old = timed(lambda: plain(backend, p))[0]
        pairs.append((old, new))
    load.append(os.getloadavg()[0])
    throughput: dict[int, list[float]] = {1: [], 8: [], 32: []}
    for _ in range(args.rounds):
        for clients in throughput:
            batch = [params[i % len(params)] for i in range(clients)]
            seconds, tokens = timed(lambda: asyncio.run(batched(backend, batch)))
            throughput[clients].append(tokens / seconds)
    load.append(os.getloadavg()[0])
    backend.close()
    ratio = statistics.median(new / old for old, new in pairs)
    tps = {c: statistics.median(v) for c, v in throughput.items()}
    print(f"decoder in process (SmolLM2-135M, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"1-minute load {min(load):.1f}..{max(load):.1f})")
    print(f"one request, batched decoder / plain loop, median of {len(pairs)} interleaved pairs: {ratio:.3f} "
          f"(plain median {statistics.median(o for o, _ in pairs):.2f} s, batched "
          f"{statistics.median(n for _, n in pairs):.2f} s)")
    for c, v in tps.items():
        print(f"{c:3d} concurrent requests: {v:7.1f} tokens/s ({v / tps[1]:.2f}x one request)")
    print(json.dumps({"one_request_batched_over_plain": round(ratio, 3),
                      **{f"tokens_per_s_{c}": round(v, 2) for c, v in tps.items()},
                      "tokens_per_s_8_over_1": round(tps[8] / tps[1], 2),
                      "tokens_per_s_32_over_8": round(tps[32] / tps[8], 2),
                      "torch_threads": torch.get_num_threads(), "load1_min": round(min(load), 2), "load1_max": round(max(load), 2)}))


if __name__ == "__main__":
    main()
