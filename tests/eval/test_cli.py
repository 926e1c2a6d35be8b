"""`knowpatch eval`: its settings (the service's, with the flags on top), and end to end on the real
SmolLM2: a few CounterFact cases, two batches."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from evaluation.cli import _device, add_eval_parser, eval_settings, main, parse_layers
from service.bootstrap import hparams_from
from service.errors import InvalidRequest
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


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", "counterfact", *argv])


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No KNOWPATCH_ settings but those the test sets (and no .env: the tests run where there is none)."""
    for name in [k for k in os.environ if k.startswith("KNOWPATCH_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_settings_are_the_services_with_the_flags_given_on_top(environment):
    environment.setenv("KNOWPATCH_PROFILE", "paper")
    environment.setenv("KNOWPATCH_STATS_TOKENS", "5000")
    environment.setenv("KNOWPATCH_HPARAM_OVERRIDES", '{"kl_factor": 0.5, "v_lr": 0.2}')
    settings = eval_settings(_parse("--stats-tokens", "7000", "--v-lr", "0.3", "--v-stop-nll", "off"))
    assert (settings.profile, settings.stats_tokens, settings.method) == ("paper", 7000, "alphaedit")
    assert settings.hparam_overrides == {"kl_factor": 0.5, "v_lr": 0.3, "v_stop_nll": None}
    hparams = hparams_from(settings)
    assert (hparams.profile, hparams.stats_tokens, hparams.v_lr, hparams.kl_factor) == ("paper", 7000, 0.3, 0.5)
    assert hparams.v_stop_nll is None  # the paper profile's stop at NLL 0.05, switched off by the flag
    assert eval_settings(_parse("--profile", "default")).profile == "default"


def test_stop_margin_flag_sets_the_setting_or_switches_the_stop_off(environment):
    environment.setenv("KNOWPATCH_STOP_MARGIN", "2")
    assert hparams_from(eval_settings(_parse())).v_stop_greedy_margin == 2.0
    margin_zero = eval_settings(_parse("--v-stop-greedy-margin", "0"))
    assert margin_zero.stop_margin == 0.0 and hparams_from(margin_zero).v_stop_greedy_margin == 0.0
    off = eval_settings(_parse("--v-stop-greedy-margin", "off"))
    assert off.hparam_overrides == {"v_stop_greedy_margin": None}
    assert hparams_from(off).v_stop_greedy_margin is None


def test_device_is_the_flag_else_the_setting_else_auto(environment):
    import torch

    assert _device(eval_settings(_parse())) == ("cuda" if torch.cuda.is_available() else "cpu")
    environment.setenv("KNOWPATCH_DEVICE", "meta")
    assert _device(eval_settings(_parse())) == "meta"
    assert _device(eval_settings(_parse("--device", "cpu"))) == "cpu"


def test_invalid_settings_are_refused_as_invalid_requests(environment):
    with pytest.raises(InvalidRequest, match="norm_penalty"):
        eval_settings(_parse("--norm-penalty", "-1"))


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
