"""What the quality gates cost on SmolLM2: the same CounterFact edits applied by real Workers (SQLite
ledgers in a temporary folder, one edit per batch) with the gates off and with the shipped defaults
(the default probes, no thresholds). Prints a table; the last line is one JSON object.

    .venv/bin/python bench/gate_cost.py [--edits 6] [--rounds 1] [--device cpu]

Each setting has its own editor (two copies of the model), and the two apply the same edits in
lockstep, alternating which goes first, so both see the same model state and a machine whose load
drifts (a shared one) weighs on both alike. Apply seconds are one `process_next` (claim, measure,
compute, gates, record, install), as the service spends them; gates_s is what the worker records
for the gates of the edit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.corpus import TextCorpus  # noqa: E402
from service.engine.editor import Editor  # noqa: E402
from service.engine.gates import Gates, server_gates  # noqa: E402
from service.engine.types import load_hparams  # noqa: E402
from service.ledger import repository as repo  # noqa: E402
from service.ledger.db import make_engine, migrate, session_factory  # noqa: E402
from service.model.loading import load_model  # noqa: E402
from service.queue.local import LocalQueue  # noqa: E402
from workers.worker import Worker  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
COUNTERFACT = DATA / "counterfact" / "counterfact-train.json"
WIKITEXT = DATA / "corpus" / "wikitext2_raw_test.txt"
SETTINGS = {"off": server_gates(probes="none"), "defaults": server_gates()}


def requests(start: int, n: int) -> list[dict]:
    """CounterFact rows as stored edit requests, with their rephrase and locality prompts (measured too)."""
    rows = json.loads(COUNTERFACT.read_text())[start : start + n]
    return [{"subject": r["subject"], "prompt": r["prompt"], "target_new": r["target_new"],
             "target_true": r["ground_truth"], "rephrase_prompts": [r["rephrase_prompt"]],
             "locality_prompts": [r["locality_prompt"]]} for r in rows]


def worker(editor: Editor, gates: Gates, edits: list[dict], folder: Path) -> tuple[Worker, list[str]]:
    """A Worker on a fresh ledger holding `edits` queued; its start resets the editor to the base weights."""
    url = f"sqlite:///{folder / f'ledger-{time.monotonic_ns()}.db'}"
    migrate(url)
    sessions = session_factory(make_engine(url))
    started = Worker(editor, sessions, LocalQueue(), batch_size=1, gates=gates)
    started.start()
    with sessions.begin() as session:
        rows, _ = repo.create_edits(session, edits, subjects=[e["subject"] for e in edits], requested_by="bench",
                                    method=editor.method, idempotency_key=None)
        return started, [row.id for row in rows]


def apply_next(worker: Worker, edit_id: str) -> dict:
    """One edit through the worker: apply seconds, its recorded gates_s and status."""
    started = time.perf_counter()
    worker.process_next()
    seconds = time.perf_counter() - started
    with worker.sessions() as session:
        record = repo.get_edit(session, edit_id)
        return {"apply_s": seconds, "gates_s": (record.metrics_after or {}).get("gates_s"), "status": record.status}


def run(editors: dict[str, Editor], edits: list[dict], folder: Path) -> dict[str, list[dict]]:
    """Each setting applies `edits` from the base weights, edit by edit in lockstep."""
    workers = {name: worker(editors[name], SETTINGS[name], edits, folder) for name in SETTINGS}
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for i in range(len(edits)):
        for name in (list(SETTINGS) if i % 2 == 0 else list(reversed(SETTINGS))):
            started, ids = workers[name]
            results[name].append(apply_next(started, ids[i]))
        print(f"edit {i}: " + ", ".join(f"{name} {rows[-1]['apply_s']:.1f} s" for name, rows in results.items()),
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=6, help="CounterFact edits per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of the edits from the base weights")
    parser.add_argument("--start", type=int, default=300, help="first CounterFact row")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    missing = [str(p) for p in (COUNTERFACT, WIKITEXT) if not p.exists()]
    if missing:
        print(f"skipped: the benchmark needs {', '.join(missing)} (see ../shared/data/README.md)")
        return

    editors = {name: editor(args.device) for name in SETTINGS}
    edits = requests(args.start, args.edits)
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for name, rows in run(editors, edits, Path(folder)).items():
                results[name] += rows
    report(results, args)


def editor(device: str) -> Editor:
    """SmolLM2 as the service builds it (statistics over WikiText-2 here, cached in ~/.cache/knowpatch)."""
    cache = Path.home() / ".cache" / "knowpatch"
    loaded = load_model("smollm2", device=device, cache_dir=cache)
    return Editor.create(loaded, load_hparams("smollm2"), TextCorpus(WIKITEXT), cache, progress=False,
                         keep_factors=False)


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    apply = {name: statistics.median(e["apply_s"] for e in rows) for name, rows in results.items()}
    gates = {name: statistics.median(e["gates_s"] or 0.0 for e in rows) for name, rows in results.items()}
    statuses = {name: sorted({e["status"] for e in rows}) for name, rows in results.items()}
    ratio = apply["defaults"] / apply["off"]
    paired = statistics.median(on["apply_s"] / off["apply_s"] for on, off in zip(results["defaults"], results["off"]))
    share = statistics.median((e["gates_s"] or 0.0) / e["apply_s"] for e in results["defaults"])
    for name in results:
        print(f"gates {name:9s} apply {apply[name]:7.2f} s/edit median, gates_s {gates[name]:.3f} s median "
              f"over {len(results[name])} edits (statuses {', '.join(statuses[name])})")
    print(f"apply with the default gates / without: {ratio:.3f} (medians), {paired:.3f} (median of the same "
          f"edit's ratios); gates_s / apply_s per edit (median): {share:.3f}")
    print(json.dumps({
        "edits": args.edits, "rounds": args.rounds, "start": args.start, "device": args.device,
        "apply_median_s": {k: round(v, 3) for k, v in apply.items()},
        "gates_median_s": {k: round(v, 4) for k, v in gates.items()},
        "apply_ratio_defaults_over_off": round(ratio, 3), "apply_ratio_paired_median": round(paired, 3),
        "gates_share_of_apply": round(share, 4),
        "statuses": statuses,
    }))


if __name__ == "__main__":
    main()
