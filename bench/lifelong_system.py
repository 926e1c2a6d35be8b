"""The system at 10,000 active edits: restart, memory, edit cost, rollback, read routes.

    .venv/bin/python bench/lifelong_system.py [--edits 10000] [--batch 100] [--work /tmp/kp-lifelong]

1. Fills a SQLite ledger with N applied edits (SYNTHETIC factors of the right shapes, on the
   factor grid, written through the real repository code: see bench/_ledger_fill.py). Making 10,000
   real edits takes hours on this CPU; the system costs measured here do not depend on what the
   factors say.
2. Replays it the way the worker does at start-up (one read of the factor rows, chain and checksums
   verified, the factor store's sums rebuilt, the weights digest checked), timing each part.
3. Reports the factor store's memory, and the ledger's bytes per edit and layer.
4. Computes and commits the same real edit (a CounterFact case, or a built-in one) at 0 and at N
   active edits, interleaved, median of --repeats.
5. Rolls back the FIRST edit at N active edits with its factors read from the ledger, checks the
   result equals a from-scratch replay without it bit for bit, and times it.
6. Starts `knowpatch serve` on the ledger (restart to /ready, over HTTP), then times GET /edits
   pages and GET /info.

Prints a JSON line with every figure at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402

from _ledger_fill import fill  # noqa: E402
from service.bootstrap import build_editor  # noqa: E402
from service.config import Settings  # noqa: E402
from service.engine.editor import Editor  # noqa: E402
from service.engine.types import EditRequest  # noqa: E402
from service.ledger import repository as repo  # noqa: E402
from service.ledger.db import make_engine, migrate, session_factory  # noqa: E402
from service.ledger.tensors import to_engine  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
FALLBACK = EditRequest("Eiffel Tower", "The Eiffel Tower is located in the city of", "Rome", "Paris",
                       ("The Eiffel Tower can be found in",))


def _request() -> EditRequest:
    if not DATA.is_file():
        return FALLBACK
    case = json.loads(DATA.read_text())[0]
    return EditRequest(case["subject"], case["prompt"], case["target_new"], case["ground_truth"],
                       (case["rephrase_prompt"],))


def replay(editor: Editor, url: str) -> tuple[dict, list[repo.ActiveEdit]]:
    """The worker's start-up replay, part by part."""
    engine = make_engine(url)
    parts = {}
    try:
        with session_factory(engine)() as session:
            t = time.perf_counter()
            verified, active = repo.verified_active_edits(session)
            parts["read_and_verify_s"] = time.perf_counter() - t
            head_seq, _ = repo.head(session)
            digest = repo.head_digest(session)
    finally:
        engine.dispose()
    t = time.perf_counter()
    edits = [to_engine(a.edit_id, a.batch_id, a.factors, editor.layers) for a in active]
    parts["decode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    editor.load(edits, version=head_seq)
    parts["sums_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ok = editor.weights_digest() == digest
    parts["digest_s"] = time.perf_counter() - t
    parts["replay_s"] = sum(parts.values())
    parts.update(edits=len(active), operations_verified=verified, digest_ok=ok)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in parts.items()}, active


def edit_cost(editors: dict[str, Editor], request: EditRequest, repeats: int) -> dict:
    """compute + plan_commit of the same edit on each editor, interleaved (not installed)."""
    times: dict[str, list[float]] = {name: [] for name in editors}
    for rep in range(repeats):
        for name, editor in editors.items():
            t = time.perf_counter()
            update = editor.compute([request], [f"bench-{name}-{rep}"], f"bench-{rep}")
            editor.plan_commit(update)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    names = list(editors)
    return {f"edit_s_{n}": round(med[n], 3) for n in names} | {
        "edit_cost_ratio": round(med[names[1]] / med[names[0]], 3), "edit_samples": times}


def rollback_first(editor: Editor, url: str, active: list[repo.ActiveEdit], settings: Settings) -> dict:
    """Revert the first active edit with its factors from the ledger; compare with a fresh replay."""
    first = active[0]
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            t = time.perf_counter()
            stored = repo.verified_factors(session, first.edit_id)  # as the worker reads it
            read_s = time.perf_counter() - t
    finally:
        engine.dispose()
    factors = to_engine(first.edit_id, first.batch_id, stored, editor.layers)
    t = time.perf_counter()
    editor.install(editor.plan_revert(first.edit_id, factors), editor.version + 1)
    revert_s = time.perf_counter() - t
    fresh = build_editor(settings, progress=False, keep_factors=False)
    try:
        fresh.load([to_engine(a.edit_id, a.batch_id, a.factors, fresh.layers) for a in active[1:]], editor.version)
        exact = fresh.weights_digest() == editor.weights_digest()
    finally:
        fresh.close()
    return {"rollback_read_s": round(read_s, 4), "rollback_revert_s": round(revert_s, 3),
            "rollback_s": round(read_s + revert_s, 3), "rollback_exact": exact}


def serve_and_read(data_dir: Path, port: int, calls: int, log_path: Path, cache_dir: Path | None = None) -> dict:
    env = {**os.environ, "KNOWPATCH_DATA_DIR": str(data_dir), "KNOWPATCH_BATCH_SIZE": "8"}
    if cache_dir is not None:
        env["KNOWPATCH_CACHE_DIR"] = str(cache_dir)
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "knowpatch", "serve", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            ready_s = _wait_ready(client, proc, started)
            pages, info = _timed_reads(client, calls)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    text = log_path.read_text()
    replay = re.search(r"replayed (\d+) active edits \((.*)\) to version \d+ in ([\d.]+) s", text)
    return {"serve_ready_s": round(ready_s, 2), "serve_replay_s": float(replay.group(3)) if replay else None,
            "serve_replay_how": replay.group(2) if replay else None,
            "edits_page_ms_p50": round(statistics.median(pages), 2), "edits_page_ms_max": round(max(pages), 2),
            "info_ms_p50": round(statistics.median(info), 2), "info_ms_max": round(max(info), 2)}


def serve_twice(data_dir: Path, args: argparse.Namespace) -> dict:
    """A first start with no factor-store snapshot (all factors read and summed), then a restart
    from the snapshot the first one wrote; the model cache is the user's, the snapshot folder fresh."""
    cache = args.work / "cache"
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    for entry in (Settings().cache_dir).iterdir():  # the converted model and statistics, not snapshots
        if entry.name != "snapshots":
            (cache / entry.name).symlink_to(entry)
    results = {}
    for start in ("cold", "snapshot"):
        results[start] = serve_and_read(data_dir, args.port, args.calls, args.work / f"serve-{start}.log", cache)
        print(f"serve ({start}): {results[start]}", flush=True)
    return results


def _wait_ready(client: httpx.Client, proc: subprocess.Popen, started: float) -> float:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"knowpatch serve exited with {proc.returncode}")
        try:
            if client.get("/ready").status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def _timed_reads(client: httpx.Client, calls: int) -> tuple[list[float], list[float]]:
    pages, info, cursor = [], [], None
    for i in range(calls):
        params = {"limit": 50} | ({"cursor": cursor} if cursor else {})
        t = time.perf_counter()
        page = client.get("/edits", params=params)
        pages.append(1000 * (time.perf_counter() - t))
        page.raise_for_status()
        cursor = page.json().get("next_cursor") if i % 5 else None  # walk a few pages deep, then restart
        t = time.perf_counter()
        client.get("/info").raise_for_status()
        info.append(1000 * (time.perf_counter() - t))
    return pages, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100, help="edits per synthetic batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=30, help="GET /edits and GET /info calls")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kp-lifelong"))
    parser.add_argument("--serve-only", action="store_true", help="only the HTTP part, on an existing ledger")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    data_dir = args.work / f"ledger-{args.edits}-b{args.batch}"
    url = f"sqlite:///{(data_dir / 'ledger.db').resolve()}"
    results: dict = {"edits": args.edits, "batch": args.batch}
    if args.serve_only:
        results["serve"] = serve_twice(data_dir, args)
        print(json.dumps(results))
        return
    if not (data_dir / "ledger.db").exists():
        filler = build_editor(settings, progress=False, keep_factors=False)
        try:
            results["fill"] = fill(filler, data_dir, args.edits, args.batch, seed=0)
        finally:
            filler.close()
        print(f"filled: {results['fill']}", flush=True)
    else:
        migrate(url)  # a ledger kept from an earlier run: bring its schema up to date, as `serve` does
    t = time.perf_counter()
    editor = build_editor(settings, progress=False, keep_factors=False)
    results["model_and_stats_load_s"] = round(time.perf_counter() - t, 2)
    results["replay"], active = replay(editor, url)
    print(f"replay: {results['replay']}", flush=True)
    memory = editor.store.memory_bytes()
    rows = sum(len(a.factors) for a in active)
    floats = sum(f.r.size + f.a.size + f.k.size for a in active[:10] for f in a.factors) / sum(
        len(a.factors) for a in active[:10])
    results["memory"] = {**memory, "index_bytes_per_edit": round(memory["index"] / max(1, len(active)), 1),
                         "ledger_bytes": (data_dir / "ledger.db").stat().st_size,
                         "ledger_factor_bytes_per_edit_layer": int(floats * 4), "factor_rows": rows}
    print(f"memory: {results['memory']}", flush=True)
    empty = build_editor(settings, progress=False, keep_factors=False)
    try:
        results["cost"] = edit_cost({"0": empty, str(args.edits): editor}, _request(), args.repeats)
    finally:
        empty.close()
    print(f"edit cost: { {k: v for k, v in results['cost'].items() if k != 'edit_samples'} }", flush=True)
    results["rollback"] = rollback_first(editor, url, active, settings)
    print(f"rollback: {results['rollback']}", flush=True)
    editor.close()
    results["serve"] = serve_twice(data_dir, args)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
