"""`knowpatch eval` and `knowpatch eval-compare` (also `python -m evaluation.cli ...`).

    knowpatch eval counterfact --n 500 --batch-size 50 --method alphaedit --device cuda --out runs/cf-alphaedit
    knowpatch eval zsre --n 500 --batch-size 50 --url http://localhost:8000 --api-key $KEY
    knowpatch eval-compare runs/cf-alphaedit runs/cf-memit --out runs/cf-compare

In-process, the editor is the one the service builds (service.bootstrap.build_editor) from the
same KNOWPATCH_* settings: `KNOWPATCH_PROFILE=paper knowpatch eval ...` evaluates the paper profile,
and each editing flag given overrides its setting.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from evaluation.data import DEFAULT_PATHS, load_cases, load_heldout, load_knowns
from evaluation.report import metrics_table, write_comparison, write_partial, write_run
from evaluation.runner import EvalInputs, ProtocolSettings, run_protocol
from evaluation.targets import Target
from service.config import Settings
from service.errors import InvalidRequest, KnowpatchError

log = logging.getLogger(__name__)
OFF = "off"
# Editing flags, by their argparse dest: those that are settings (Settings fields), and hyper-parameters
# without a setting of their own (HyperParams fields, passed as Settings.hparam_overrides).
SETTINGS_FLAGS = ("model", "device", "dtype", "method", "profile", "corpus", "cache_dir", "seed", "layers",
                  "stats_tokens", "nullspace_threshold", "nullspace_energy", "stop_margin", "norm_penalty")
HPARAM_FLAGS = ("v_lr", "v_num_grad_steps", "v_stop_nll", "L2", "mom2_update_weight", "clamp_norm_factor",
                "kl_factor")


def parse_layers(text: str) -> list[int]:
    """"4,5,6" or "4-8" (inclusive)."""
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        layers.extend(range(int(first), int(last or first) + 1))
    return layers


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `eval` and `eval-compare` on the knowpatch command's subparsers."""
    p = subparsers.add_parser("eval", help="evaluate sequential editing on CounterFact or zsRE",
                              description="The AlphaEdit paper's protocol: n cases edited in batches, in order, "
                                          "never undone; the unedited and the final model scored on all n cases. "
                                          "In-process, the editor is built as the service builds it, from the "
                                          "KNOWPATCH_* settings (environment or .env); the editing flags given "
                                          "override them.")
    p.add_argument("dataset", choices=["counterfact", "zsre"])
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, help="dataset file (default: ../shared/data/<dataset>/...)")
    data.add_argument("--n", type=int, default=500, help="cases, the first n editable ones in file order (500)")
    data.add_argument("--knowns", type=Path, help=f"control facts (default {DEFAULT_PATHS['knowns'].name})")
    data.add_argument("--control-n", type=int, default=100, help="control facts used, spread over the file (100)")
    data.add_argument("--control-tokens", type=int, default=8,
                      help="greedy tokens of each control prompt that must stay unchanged (8)")
    data.add_argument("--ppl-text", type=Path, help="text whose END is the perplexity slice (default WikiText-2)")
    data.add_argument("--ppl-chunks", type=int, default=16, help="perplexity chunks of 192 words (16; 0: none)")
    data.add_argument("--fluency-tokens", type=int, default=100,
                      help="greedy tokens per fluency generation (100; 0: none)")
    protocol = p.add_argument_group("protocol")
    protocol.add_argument("--batch-size", type=int, default=50, help="edits per batch (50)")
    protocol.add_argument("--checkpoint-every", type=int, default=0,
                          help="score the cases edited so far every k edits (0: about five checkpoints)")
    protocol.add_argument("--checkpoints", type=_int_list,
                          help="explicit checkpoints, e.g. 1000,2000,5000 (instead of --checkpoint-every)")
    protocol.add_argument("--sample", type=int,
                          help="score a fixed random sample of at most this many of the cases edited so far")
    protocol.add_argument("--first-k", type=int, help="also report the case metrics of the first k cases")
    protocol.add_argument("--fluency-n", type=int,
                          help="fluency at every checkpoint on this many sampled cases (default: all, ends only)")
    protocol.add_argument("--out", type=Path, help="run folder (default eval-results/<dataset>-<method>-n<n>-<time>)")
    protocol.add_argument("--quiet", action="store_true", help="no progress bars")
    editing = p.add_argument_group(
        "editing (in-process)", "The service's settings, KNOWPATCH_* in the environment or .env, with these flags on "
                                "top: a flag given overrides the setting named in its help, one left out keeps it. "
                                "From --v-lr on, each flag overrides its hyper-parameter's entry of "
                                "KNOWPATCH_HPARAM_OVERRIDES (JSON, e.g. '{\"v_lr\": 0.3}').")
    editing.add_argument("--method", choices=["alphaedit", "memit"], help="KNOWPATCH_METHOD (alphaedit)")
    editing.add_argument("--model", help="'smollm2' (embedded), a local path or a cached HF id; KNOWPATCH_MODEL")
    editing.add_argument("--device", help="cpu, cuda, cuda:1, ... or auto: cuda if available; KNOWPATCH_DEVICE (auto)")
    editing.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="KNOWPATCH_DTYPE (float32)")
    editing.add_argument("--corpus", help="preserved-knowledge text: 'self' or a file / folder; KNOWPATCH_CORPUS")
    editing.add_argument("--stats-tokens", type=int, help="token budget of the key statistics; KNOWPATCH_STATS_TOKENS")
    editing.add_argument("--nullspace-threshold", type=float, help="KNOWPATCH_NULLSPACE_THRESHOLD")
    editing.add_argument("--nullspace-energy", type=float, help="KNOWPATCH_NULLSPACE_ENERGY")
    editing.add_argument("--layers", type=parse_layers, help="edited layers, e.g. 4,5,6,7,8 or 4-8; KNOWPATCH_LAYERS")
    editing.add_argument("--profile", choices=["default", "paper"],
                         help="hyper-parameter profile of the model's file: the project's lifelong set or the "
                              "paper's; KNOWPATCH_PROFILE (default)")
    editing.add_argument("--v-stop-greedy-margin", dest="stop_margin", metavar="MARGIN", type=_float_or_off,
                         help="most-probable early stop: every target token the argmax by this log-prob margin "
                              "('off': none); KNOWPATCH_STOP_MARGIN")
    editing.add_argument("--norm-penalty", type=float,
                         help="weight of the accumulated-update norm in the solve; KNOWPATCH_NORM_PENALTY")
    editing.add_argument("--seed", type=int, help="samples, context templates, self corpus, torch; KNOWPATCH_SEED (0)")
    editing.add_argument("--cache-dir", type=Path, help="converted models and statistics; KNOWPATCH_CACHE_DIR")
    editing.add_argument("--v-lr", type=float, help="compute_z learning rate (v_lr)")
    editing.add_argument("--v-steps", dest="v_num_grad_steps", metavar="STEPS", type=int,
                         help="compute_z steps (v_num_grad_steps)")
    editing.add_argument("--v-stop-nll", type=_float_or_off, help="stop a target at this mean NLL ('off': never)")
    editing.add_argument("--l2", dest="L2", metavar="L2", type=float, help="AlphaEdit's ridge L2")
    editing.add_argument("--mom2-weight", dest="mom2_update_weight", metavar="WEIGHT", type=float,
                         help="MEMIT's lambda on C0 (mom2_update_weight)")
    editing.add_argument("--clamp-norm-factor", type=float, help="largest ||delta|| / ||h0|| of a target")
    editing.add_argument("--kl-factor", type=float, help="weight of the KL term of the target optimisation")
    service = p.add_argument_group("service (over HTTP)")
    service.add_argument("--url", help="drive a running knowpatch service instead of an in-process editor")
    service.add_argument("--api-key", default=os.environ.get("KNOWPATCH_API_KEY"),
                         help="bearer key with edits:write and generate scopes (env KNOWPATCH_API_KEY)")
    p.set_defaults(func=run_eval)

    c = subparsers.add_parser("eval-compare", help="combine eval runs into one table and plots")
    c.add_argument("runs", nargs="+", type=Path, help="run folders written by `knowpatch eval`")
    c.add_argument("--out", type=Path, required=True, help="folder for comparison.md and the plots")
    c.set_defaults(func=run_compare)


def _float_or_off(text: str) -> float | str:
    return OFF if text == OFF else float(text)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _checkpoint_every(args: argparse.Namespace) -> int:
    if args.checkpoint_every > 0:
        return args.checkpoint_every
    return args.batch_size * max(1, round(args.n / args.batch_size / 5))


def _inputs(args: argparse.Namespace) -> tuple[EvalInputs, dict[str, Any]]:
    loaded = load_cases(args.dataset, args.data, args.n)
    knowns = load_knowns(args.knowns, args.control_n)
    heldout = load_heldout(args.ppl_text, args.ppl_chunks) if args.ppl_chunks > 0 else None
    return EvalInputs(loaded.cases, knowns, heldout), {"data": str(loaded.path), "skipped": loaded.skipped}


def _save_partial(partial: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    write_partial(partial, config, out)


def eval_settings(args: argparse.Namespace) -> Settings:
    """The service's settings, read from the environment as the service reads them, with the editing
    flags given on top. 'off' unsets a stop, which only a hyper-parameter override can say."""
    named = {name: getattr(args, name) for name in SETTINGS_FLAGS if getattr(args, name) is not None}
    hparams = {name: getattr(args, name) for name in HPARAM_FLAGS if getattr(args, name) is not None}
    if named.get("stop_margin") == OFF:
        hparams["v_stop_greedy_margin"] = named.pop("stop_margin")
    try:
        settings = Settings(**named)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid settings: {exc}") from exc
    overrides = {**settings.hparam_overrides, **{k: None if v == OFF else v for k, v in hparams.items()}}
    return settings.model_copy(update={"hparam_overrides": overrides})


def _seed(settings: Settings) -> int:
    """The run's seed: --seed, else KNOWPATCH_SEED, else 0 (in-process, the hyper-parameters' context_seed,
    0 in every shipped file, then seeds the context templates, the self corpus and torch)."""
    return 0 if settings.seed is None else settings.seed


def _device(settings: Settings) -> str:
    """--device, else KNOWPATCH_DEVICE, else the command's own default "auto": the first CUDA device if any."""
    name = settings.device if "device" in settings.model_fields_set else "auto"
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _open_target(args: argparse.Namespace, settings: Settings, inputs: EvalInputs) -> tuple[Target, dict[str, float]]:
    if args.url:
        from evaluation.targets.service import ServiceTarget

        return ServiceTarget(args.url, args.api_key, method=settings.method), {}
    from evaluation.targets.engine import EngineTarget, open_editor

    on_device = settings.model_copy(update={"device": _device(settings)})
    editor, timings = open_editor(on_device, inputs.heldout, progress=not args.quiet)
    return EngineTarget(editor), timings


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("knowpatch", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _config(args: argparse.Namespace, settings: Settings, data: dict[str, Any], described: dict[str, Any],
            every: int) -> dict[str, Any]:
    config = {
        "dataset": args.dataset, "n": args.n, "batch_size": args.batch_size, "checkpoint_every": every,
        "method": settings.method, "model": settings.model, "corpus": settings.corpus, "seed": _seed(settings),
        "profile": settings.profile, "checkpoints": list(args.checkpoints or ()), "sample": args.sample,
        "first_k": args.first_k, "fluency_n": args.fluency_n,
        "control_n": args.control_n, "control_tokens": args.control_tokens, "ppl_chunks": args.ppl_chunks,
        "fluency_tokens": args.fluency_tokens, "url": args.url, **data, **described, "versions": _versions(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if args.url:  # the service decides the model; what it reports is what was evaluated
        config["model"] = described.get("service_info", {}).get("model", f"service at {args.url}")
        config["device"] = described.get("service_info", {}).get("device", "service")
    return config


def run_eval(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    settings = eval_settings(args)
    every = _checkpoint_every(args)
    inputs, data = _inputs(args)
    protocol = ProtocolSettings(args.dataset, args.batch_size, every, args.fluency_tokens, args.control_tokens,
                                args.checkpoints or (), args.sample, _seed(settings), args.first_k, args.fluency_n)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("eval-results") / f"{args.dataset}-{settings.method}-n{args.n}-{stamp}"
    target, setup_timings = _open_target(args, settings, inputs)
    try:
        config = _config(args, settings, data, target.describe(), every)
        results = run_protocol(target, inputs, protocol, progress=not args.quiet,
                               on_checkpoint=lambda partial: _save_partial(partial, config, out))
        described = target.describe()
    finally:
        target.close()
    results["config"] = _config(args, settings, data, described, every)
    results["timings"] = {**setup_timings, **results["timings"], "total_s": time.perf_counter() - start}
    write_run(results, out)
    print(metrics_table([results]))
    print(f"{results['edits_applied']} of {args.n} edits applied; {results['timings']['total_s']:.1f} s; "
          f"results in {out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    written = write_comparison(args.runs, args.out)
    print(written[0].read_text())
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="knowpatch", description="knowpatch evaluation")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call drowns the progress bar
    try:
        return args.func(args)
    except KnowpatchError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
