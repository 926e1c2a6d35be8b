"""What transformers' own continuous batching costs on this CPU (README, "Serving"): a persistent
ContinuousBatchingManager (first request, then steady requests) against `generate_batch`, which builds
a manager per call, and plain `generate`, on a 2-layer random Llama (the cost is the manager's set-up,
not the model's). Prints one line per measurement; the last line is one JSON object.

    .venv/bin/python bench/transformers_cb.py [--requests 3] [--new-tokens 8]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def timed(label: str, fn, out: dict) -> None:
    started = time.perf_counter()
    fn()
    out.setdefault(label, []).append(round(time.perf_counter() - started, 4))
    print(f"{label:28s} {out[label][-1]:8.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    model = tiny_llama()
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    prompt = [1, 2, 3, 4]
    out: dict[str, list[float]] = {}
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        for _ in range(args.requests):
            def one() -> None:
                request_id = manager.add_request(prompt, max_new_tokens=args.new_tokens)
                manager.get_result(request_id=request_id, timeout=300)
            timed("persistent manager, 1 req", one, out)
    finally:
        manager.stop(block=True)
    for _ in range(2):
        timed("generate_batch, 2 reqs", lambda: model.generate_batch([prompt, prompt + [5]], generation_config=config,
                                                                      warmup=False), out)
    timed("plain generate, 1 req", lambda: model.generate(torch.tensor([prompt]), generation_config=config), out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
