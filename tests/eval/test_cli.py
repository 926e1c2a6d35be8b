"""`knowpatch eval` end to end on the real SmolLM2: a few CounterFact cases, two batches."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from evaluation.cli import add_eval_parser, main, parse_layers
from tests.conftest import TEST_CACHE, shared_data


def test_layers_accept_lists_and_ranges():
    assert parse_layers("4,5,6") == [4, 5, 6]
    assert parse_layers("4-8") == [4, 5, 6, 7, 8]
    assert parse_layers("2,4-5") == [2, 4, 5]


def test_parser_registers_both_commands_for_the_knowpatch_cli():
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "zsre", "--n", "20", "--batch-size", "10", "--method", "memit",
                              "--layers", "4-6"])
    assert (args.dataset, args.n, args.batch_size, args.method, args.layers) == ("zsre", 20, 10, "memit", [4, 5, 6])
    assert args.func.__name__ == "run_eval"
    args = parser.parse_args(["eval-compare", "a", "b", "--out", "c"])
    assert args.func.__name__ == "run_compare" and args.runs == [Path("a"), Path("b")]


@pytest.mark.slow
def test_eval_counterfact_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    wikitext = shared_data("wikitext")
    code = main([
        "eval", "counterfact", "--n", "4", "--batch-size", "2", "--checkpoint-every", "2",
        "--data", str(shared_data("counterfact")), "--knowns", str(shared_data("knowns")), "--ppl-text", str(wikitext),
        "--stats-tokens", "20000", "--corpus", str(wikitext), "--device", "cpu",
        "--cache-dir", str(TEST_CACHE), "--control-n", "10", "--ppl-chunks", "2", "--fluency-tokens", "20",
        "--out", str(out), "--quiet",
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {"config", "baseline", "final", "checkpoints", "batches", "timings"} <= set(results)
    config = results["config"]
    assert (config["n"], config["batch_size"], config["method"], config["device"]) == (4, 2, "alphaedit", "cpu")
    assert config["hparams"]["stats_tokens"] == 20000 and config["layers"] == [4, 5, 6, 7, 8]
    assert all(0 < int(kept) for kept in config["null_space_dims"].values())
    assert [c["edits"] for c in results["checkpoints"]] == [0, 2, 4]
    assert len(results["batches"]) == 2 and all(b["applied"] for b in results["batches"])
    assert all(b["timings"]["targets_s"] > 0 for b in results["batches"])
    before, after = results["baseline"], results["final"]
    assert before["efficacy"] <= 25 and after["efficacy"] >= 75
    assert after["efficacy_top1"] >= 50  # teacher-forced argmax of the new target on the edited prompt
    assert after["perplexity"] < 1.5 * before["perplexity"] and after["fluency"] > 0
    for name in ("cases.json", "results.md", "curves.png", "perplexity.png"):
        assert (out / name).stat().st_size > 0
    assert "| alphaedit | 4 |" in capsys.readouterr().out

    compare = tmp_path / "compare"
    assert main(["eval-compare", str(out), str(out), "--out", str(compare)]) == 0
    assert (compare / "comparison.md").is_file() and (compare / "curves.png").is_file()
