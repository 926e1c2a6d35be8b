"""The long form of the fault and attack suite (tests/chaos runs one trial of each kind in CI):

    .venv/bin/python bench/chaos.py --trials 30 --redis-trials 6 --postgres-trials 6 --api-trials 4 \
        --fuzz-examples 40 --seed 2 --out results.json

Starts `knowpatch api` + `knowpatch worker` on the tests' tiny random Llama, with a throwaway Postgres
cluster (initdb into a temporary folder, on a free port) and a redis-server of their own
(tests/chaos/cluster.py), then runs
  1. --trials worker kills, the four kinds in turn (SIGKILL at a random moment, and at each fault point
     after_compute, after_commit, during_rollback), --redis-trials Redis kills (Redis alone, Redis
     and the worker together), --postgres-trials Postgres outages (pg_ctl stop -m fast while the worker
     applies, then -m immediate, 1-5 s each, requests arriving throughout; nothing of ours restarted)
     and --api-trials API kills (SIGKILL between a ledger write and its enqueue, the API restarted),
     shuffled, each under a random mix of edits and rollbacks over HTTP, each followed by a full check
     of the invariants (tests/chaos/invariants.py);
  2. schemathesis over the API's OpenAPI document, --fuzz-examples per operation and mode, in rounds
     with further seeds until at least --fuzz-requests requests were sent;
  3. a last check of the whole ledger after the fuzzed edits, a last worker started from scratch, and
     the API and worker logs searched for every key.
Prints one line per trial and the figures; the last line is one JSON object, also written to --out.
Exits 1 if any invariant failed. Needs initdb and pg_ctl (on the PATH or in /usr/lib/postgresql/*/bin;
with --postgres-trials 0, a database on the shared server, KNOWPATCH_TEST_POSTGRES, does) and
redis-server on the PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.chaos.cluster import Cluster, wait_for  # noqa: E402
from tests.chaos.fuzz import fuzz_at_least  # noqa: E402
from tests.chaos.invariants import check_ledger, pending_operations  # noqa: E402
from tests.chaos.trials import (  # noqa: E402
    API_KILLS, POSTGRES_STOPS, REDIS_KILLS, WORKER_KILLS, Replayer, TrialResult, run_trial, summarize)
from tests.chaos.workload import Accepted  # noqa: E402


def schedule(trials: int, redis_trials: int, rng: random.Random, postgres_trials: int = 0,
             api_trials: int = 0) -> list[str]:
    kinds = [WORKER_KILLS[i % len(WORKER_KILLS)] for i in range(trials)]
    kinds += [REDIS_KILLS[i % len(REDIS_KILLS)] for i in range(redis_trials)]
    kinds += [POSTGRES_STOPS[i % len(POSTGRES_STOPS)] for i in range(postgres_trials)]
    kinds += [API_KILLS[i % len(API_KILLS)] for i in range(api_trials)]
    rng.shuffle(kinds)
    return kinds


def line(i: int, result: TrialResult) -> str:
    return (f"{i:3d} {result.kind:16s} edits {result.accepted_edits:3d} rollbacks {result.accepted_rollbacks:2d} "
            f"in flight {result.in_flight:3d} lost {result.lost} dup {result.duplicated} "
            f"inconsistent {result.inconsistent} weights {result.weight_mismatches} 5xx {result.server_errors} "
            f"503 {result.unavailable} "
            f"{'reached' if result.fault_reached else 'NOT REACHED'} {result.seconds:6.1f} s "
            f"{'ok' if result.ok else 'FAILED'}")


def final_check(cluster: Cluster, replayer: Replayer) -> dict:
    """The whole ledger once more (fuzzed edits included), a worker from scratch, the logs."""
    wait_for(lambda: pending_operations(cluster.sessions) == 0, "the ledger has no pending operations", 1200, 0.5)
    findings = check_ledger(cluster.sessions, Accepted(), layers=3)
    result = run_trial(cluster, replayer, "random", seed=-1, cold_start=True)  # one more kill, from scratch
    secrets = cluster.keys.all() + [cluster.internal_token]
    leaks = {log: sum(s in (cluster.workdir / log).read_text(errors="replace") for s in secrets)
             for log in ("api.log", "worker.log")}
    return {"final_problems": findings.problems + result.problems, "keys_in_logs": leaks,
            "final_chain_length": result.chain_length}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="worker-kill trials (four kinds in turn)")
    parser.add_argument("--redis-trials", type=int, default=10, help="Redis-kill trials (two kinds in turn)")
    parser.add_argument("--postgres-trials", type=int, default=6,
                        help="Postgres-outage trials (a private cluster stopped -m fast, then -m immediate)")
    parser.add_argument("--api-trials", type=int, default=4, help="API kills between a ledger write and its enqueue")
    parser.add_argument("--fuzz-examples", type=int, default=25, help="schemathesis examples per operation and mode")
    parser.add_argument("--fuzz-requests", type=int, default=1000,
                        help="fuzz in rounds (seed, seed + 1, ...) until at least this many requests were sent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures and every trial as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster's processes on the way out
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="knowpatch-chaos-"))
    print(f"logs in {workdir}", flush=True)
    started = time.monotonic()
    import torch

    torch.set_num_threads(1)  # the in-process replay runs the tiny model: one thread is fastest
    cluster = Cluster(workdir, postgres="private" if args.postgres_trials else "auto")
    try:
        cluster.start_api()
        cluster.start_worker()
        replayer = Replayer(cluster)
        results = []
        kinds = schedule(args.trials, args.redis_trials, rng, args.postgres_trials, args.api_trials)
        for i, kind in enumerate(kinds):
            results.append(run_trial(cluster, replayer, kind, seed=args.seed * 1000 + i))
            print(line(i, results[-1]), flush=True)
            for problem in results[-1].problems:
                print(f"      {problem}", flush=True)
            if args.out:  # so far, in case the run is stopped
                args.out.write_text(json.dumps(summarize(results) | {"results": [r.as_dict() for r in results]},
                                               indent=2))
        report = fuzz_at_least(cluster.api_url, cluster.keys.everything, args.fuzz_examples, args.fuzz_requests,
                               seed=args.seed)
        for failure in report.server_errors + report.failures:
            print(f"fuzz: {failure[:400]}", flush=True)
        final = final_check(cluster, replayer)
        worker_starts, api_starts = cluster.worker_starts, cluster.api_starts
        database = "private cluster" if cluster.private_postgres else "database on the shared server"
    finally:
        cluster.close()
    figures = summarize(results) | report.figures() | final | {
        "worker_starts": worker_starts, "api_starts": api_starts, "postgres": database,
        "wall_s": round(time.monotonic() - started, 1),
        "load_average": os.getloadavg()[0], "seed": args.seed, "fuzz_examples": args.fuzz_examples}
    print(json.dumps({k: v for k, v in figures.items() if k != "final_problems"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(figures | {"results": [r.as_dict() for r in results],
                                                  "fuzz_failures": report.failures[:50],
                                                  "fuzz_server_errors": report.server_errors[:50]}, indent=2))
    failed = figures["failed_trials"] or figures["final_problems"] or report.server_errors or \
        any(figures["keys_in_logs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
