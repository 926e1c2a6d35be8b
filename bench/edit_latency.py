"""Edit latency on SmolLM2: seconds per edit at batch sizes 1 and 16, one optimisation step, the
statistics pass, peak RSS. Prints a table; the last line is one JSON object.

    .venv/bin/python bench/edit_latency.py [--edits 8] [--stats-tokens 100000] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.compute_z import compute_targets  # noqa: E402
from service.engine.corpus import TextCorpus  # noqa: E402
from service.engine.editor import Editor  # noqa: E402
from service.engine.stats import collect_second_moments  # noqa: E402
from service.engine.types import EditRequest, load_hparams  # noqa: E402
from service.model.loading import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def cases(start: int, n: int) -> list[EditRequest]:
    rows = json.loads((DATA / "counterfact" / "counterfact-train.json").read_text())[start : start + n]
    return [EditRequest(r["subject"], r["prompt"], r["target_new"], r["ground_truth"]) for r in rows]


def stats_speed(editor: Editor, tokens: int) -> float:
    corpus = TextCorpus(DATA / "corpus" / "wikitext2_raw_test.txt")
    started = time.perf_counter()
    collect_second_moments(editor.adapter, editor.trace, editor.tokenizer, corpus, editor.layers, tokens, progress=False)
    return tokens / (time.perf_counter() - started)


def step_seconds(editor: Editor, repeats: int = 3) -> float:
    """One target-optimisation step for one request (10 steps, no early stop, median of repeats)."""
    hparams = replace(editor.hparams, v_num_grad_steps=10, v_stop_loss=0.0, v_stop_nll=0.0,
                      v_stop_greedy_margin=None)
    request = cases(0, 1)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        compute_targets(editor.adapter, editor.tokenizer, request, editor.templates, hparams, editor.layers[-1])
        times.append((time.perf_counter() - started) / 10)
    return statistics.median(times)


def per_edit(editor: Editor, requests: list[EditRequest], batch: int, tag: str) -> tuple[list[float], list[dict]]:
    """Sequential batches committed one after another; seconds per edit for each batch."""
    seconds, timings = [], []
    for i in range(0, len(requests), batch):
        chunk = requests[i : i + batch]
        started = time.perf_counter()
        update = editor.compute(chunk, [f"{tag}-{i}-{j}" for j in range(len(chunk))], f"{tag}-{i}")
        editor.install(editor.plan_commit(update), editor.version + 1)
        seconds.append((time.perf_counter() - started) / len(chunk))
        timings.append(update.timings | {"steps": update.steps})
    return seconds, timings


def interleaved(editor: Editor, requests: list[EditRequest], hparams) -> tuple[list, list, list, list]:
    paper = load_hparams("smollm2", "paper").with_overrides(layers=editor.layers)
    ours = hparams.with_overrides(layers=editor.layers)
    seconds, timings, paper_seconds, paper_timings = [], [], [], []
    for i, request in enumerate(requests):
        editor.hparams = paper
        started = time.perf_counter()
        update = editor.compute([request], [f"paper-{i}"], f"paper-{i}")
        editor.plan_commit(update)
        paper_seconds.append(time.perf_counter() - started)
        paper_timings.append(update.timings | {"steps": update.steps})
        editor.hparams = ours
        started = time.perf_counter()
        update = editor.compute([request], [f"b1-{i}"], f"b1-{i}")
        editor.install(editor.plan_commit(update), editor.version + 1)
        seconds.append(time.perf_counter() - started)
        timings.append(update.timings | {"steps": update.steps})
    return seconds, timings, paper_seconds, paper_timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=8, help="edits at batch size 1")
    parser.add_argument("--batches16", type=int, default=2, help="batches of 16")
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    loaded = load_model("smollm2", device=args.device, cache_dir=Path.home() / ".cache" / "knowpatch")
    hparams = load_hparams("smollm2")
    editor = Editor.create(loaded, hparams, TextCorpus(DATA / "corpus" / "wikitext2_raw_test.txt"),
                           Path.home() / ".cache" / "knowpatch", progress=False)
    tokens_per_s = stats_speed(editor, args.stats_tokens)
    step = step_seconds(editor)
    # batch 1, interleaved: each edit computed with the paper profile (not committed), then with
    # the default profile and committed, so both see the same model state and the same machine load
    b1, b1_timings, b1_paper, paper_timings = interleaved(editor, cases(100, args.edits), hparams)
    b16, _ = per_edit(editor, cases(200, 16 * args.batches16), 16, "b16")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    targets = statistics.median(t["targets_s"] for t in b1_timings)
    keys = statistics.median(t["keys_solve_s"] for t in b1_timings)
    steps = statistics.median(t["steps"][0] for t in b1_timings)
    print(f"statistics pass     {tokens_per_s:8.0f} tokens/s  ({100_000 / tokens_per_s:.0f} s per 100k tokens)")
    print(f"optimisation step   {step:8.3f} s (one request)")
    print(f"batch 1             {statistics.median(b1):8.2f} s/edit median over {len(b1)} "
          f"(targets {targets:.2f} s in {steps:.0f} steps, keys+solve {keys:.2f} s)")
    print(f"batch 16            {statistics.median(b16):8.2f} s/edit median over {len(b16)} batches")
    paper_steps = statistics.median(t["steps"][0] for t in paper_timings)
    print(f"batch 1, paper      {statistics.median(b1_paper):8.2f} s/edit median (same edits, interleaved; "
          f"{paper_steps:.0f} steps; ratio default/paper {statistics.median(b1) / statistics.median(b1_paper):.2f})")
    print(f"peak RSS            {rss_mb:8.0f} MB")
    print(json.dumps({
        "batch1_median_s": round(statistics.median(b1), 3),
        "batch16_median_s_per_edit": round(statistics.median(b16), 3),
        "step_s": round(step, 4),
        "batch1_targets_s": round(targets, 3),
        "batch1_keys_solve_s": round(keys, 3),
        "batch1_median_steps": steps,
        "batch1_paper_median_s": round(statistics.median(b1_paper), 3),
        "batch1_paper_median_steps": paper_steps,
        "batch1_default_over_paper": round(statistics.median(b1) / statistics.median(b1_paper), 3),
        "peak_rss_mb": round(rss_mb),
        "stats_tokens_per_s": round(tokens_per_s),
        "hparams": {k: hparams.to_dict()[k] for k in ("profile", "v_lr", "v_num_grad_steps", "v_stop_nll",
                                                      "v_stop_greedy_margin", "norm_penalty", "layers")},
        "device": args.device,
    }))


if __name__ == "__main__":
    main()
