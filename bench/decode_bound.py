"""How close one client's decoding is to this machine's memory-bandwidth bound.

Decoding one sequence is a chain of matrix-vector products: every step reads every weight once, so
tokens/s can be no higher than (memory read bandwidth) / (bytes of the weights). This measures both
terms on this machine, then the model's own matrix-vector products alone (every linear layer's weight
times one row, as one decoding step runs them, nothing else), and compares them with a bare greedy
KV-cached loop over the loaded model (no server, no sampling code) and with the service's one-sequence
path. Prints a table; the last line is one JSON object.

    .venv/bin/python bench/decode_bound.py [--repeats 5] [--threads N]

Read bandwidth is timed as a sum over a float32 tensor far larger than the caches (--buffer-mb), with
torch's threads, the same ones the model's matrix-vector products use.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from bench.service_load import MAX_NEW_TOKENS, PROMPTS  # noqa: E402
from service.bootstrap import load_from  # noqa: E402
from service.config import Settings  # noqa: E402
from service.inference import GenerateParams  # noqa: E402
from service.model.adapters import cache_keyword  # noqa: E402
from workers.generation import generate_text  # noqa: E402


def read_bandwidth(buffer_mb: int, repeats: int) -> float:
    """Bytes/s of a streaming read (median of `repeats` sums over a buffer much larger than the caches)."""
    buffer = torch.ones(buffer_mb * 2**20 // 4, dtype=torch.float32)
    buffer.sum()  # touch every page once before timing
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - started)
    return buffer.numel() * 4 / statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decoding step reads: every distinct parameter tensor once (tied embeddings count once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


@torch.inference_mode()
def matvec_s(model: torch.nn.Module, repeats: int) -> float:
    """Seconds for one row through every linear layer's weight in turn (median of `repeats`): the
    weight-reading part of a decoding step, at the rate the BLAS matrix-vector kernel streams memory."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(rows[w.shape[1]], w)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


@torch.inference_mode()
def bare_decode_s(model: torch.nn.Module, input_ids: torch.Tensor, steps: int) -> float:
    """Seconds per decoding step of a greedy KV-cached loop, prefill excluded."""
    cache = {cache_keyword(model): DynamicCache(config=model.config)}  # filled in place
    out = model(input_ids=input_ids, use_cache=True, **cache)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    started = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--buffer-mb", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    bandwidth = read_bandwidth(args.buffer_mb, args.repeats)
    loaded = load_from(Settings())
    model, tokenizer = loaded.model, loaded.tokenizer
    nbytes = weight_bytes(model)
    bound = bandwidth / nbytes
    matvec = matvec_s(model, args.repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # does the kernel use the other cores at all?
    matvec_one_thread = matvec_s(model, args.repeats)
    torch.set_num_threads(threads)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"].to(model.device)
    bare_decode_s(model, ids, 4)  # warm-up
    bare = statistics.median(bare_decode_s(model, ids, MAX_NEW_TOKENS) for _ in range(args.repeats))
    service = []
    for i in range(args.repeats):  # the service's one-sequence path, prefill and detokenising included
        params = GenerateParams(PROMPTS[i % len(PROMPTS)], max_new_tokens=MAX_NEW_TOKENS)
        started = time.perf_counter()
        tokens = generate_text(model, tokenizer, params)[2]
        service.append(tokens / (time.perf_counter() - started))
    load.append(os.getloadavg()[0])
    figures = {
        "read_gb_per_s": round(bandwidth / 1e9, 2), "weight_mb": round(nbytes / 1e6, 1),
        "bound_tokens_per_s": round(bound, 1), "matvec_tokens_per_s": round(1 / matvec, 1),
        "matvec_gb_per_s": round(nbytes / matvec / 1e9, 2), "matvec_tokens_per_s_1_thread": round(1 / matvec_one_thread, 1),
        "bare_decode_tokens_per_s": round(1 / bare, 1),
        "bare_over_bound": round(1 / bare / bound, 2),
        "service_path_tokens_per_s": round(statistics.median(service), 1),
        "torch_threads": torch.get_num_threads(), "load1_min": round(min(load), 2), "load1_max": round(max(load), 2),
    }
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, 1-minute load {min(load):.1f}..{max(load):.1f}")
    print(f"streaming read bandwidth        {bandwidth / 1e9:8.2f} GB/s (sum over {args.buffer_mb} MB float32)")
    print(f"weights read per decoding step  {nbytes / 1e6:8.1f} MB ({model.dtype})")
    print(f"bound: bandwidth / weights      {bound:8.1f} tokens/s")
    print(f"matrix-vector products alone    {1 / matvec:8.1f} tokens/s ({nbytes / matvec / 1e9:.1f} GB/s: "
          f"{matvec * 1e3:.0f} ms per step in the BLAS kernel)")
    print(f"  the same on one thread          {1 / matvec_one_thread:8.1f} tokens/s")
    print(f"bare greedy KV-cached loop      {1 / bare:8.1f} tokens/s ({1 / bare / bound:.0%} of the bound, "
          f"{matvec / bare:.0%} of it in the matrix-vector products)")
    print(f"service one-sequence path       {statistics.median(service):8.1f} tokens/s "
          f"({MAX_NEW_TOKENS} tokens, prefill and detokenising included)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
