"""Service load on the embedded deployment, measured over HTTP only: edits/minute through the queue
at worker batch sizes 1 and 8, /generate latency and tokens/s at 1, 8 and 32 clients on the base model
(1 and 8 on the patched one), rollback latency, and restart time (process start -> /ready 200)
against ledger size. Prints a table; the last line is one JSON object.

    .venv/bin/python bench/service_load.py [--edits-b1 8] [--edits-b8 16] [--patched-edits 100]
                                           [--requests 24] [--rollbacks 3] [--quick]
    .venv/bin/python bench/service_load.py --url http://127.0.0.1:8000   # HTTP-only parts, on a running service
    .venv/bin/python bench/service_load.py --generation-only   # generation and patched/base only (see below)
    .venv/bin/python bench/service_load.py --first-start-only  # the first start with an empty cache, then a warm one

--generation-only skips the edits, rollbacks and restarts: the patched service replays a SYNTHETIC
ledger of --patched-edits edits (bench/_ledger_fill.py) instead of applying real ones, which is
enough for the patched/base latency (edits are merged into the weights either way) and takes
minutes instead of an hour on a loaded 2-core machine.

Without --url it starts its own `python -m knowpatch serve` processes (temp KNOWPATCH_DATA_DIR,
WikiText-2 corpus, 20k statistics tokens): one at KNOWPATCH_BATCH_SIZE=1, one at 8, then one per
restart measurement. For patched/base latency a base service also runs beside the patched one and
one client alternates between them, so that other load on the machine hits both alike (the figures
measured one after the other are reported too). The restart ledgers of 100 and 1000 edits are
SYNTHETIC (random rank-one factors written through the real ledger functions by
bench/_ledger_fill.py; see there): replay verifies them exactly like real ones, but no real edit
computation produced them. The real ledger of the batch-8 phase is restarted too, as a cross-check.
Other work on the machine skews every figure: the 1-minute load average is logged and reported.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPUS = DATA / "corpus" / "wikitext2_raw_test.txt"
COUNTERFACT = DATA / "counterfact" / "counterfact-train.json"

START_TIMEOUT_S = 900  # a first start may convert the model and compute statistics
POLL_S = 0.25  # edit status polling
ROLLBACK_POLL_S = 0.05
GENERATE_TIMEOUT_S = 300
MAX_NEW_TOKENS = 32
TERMINAL = {"applied", "failed", "cancelled", "rolled_back"}
PROMPTS = [  # fixed, unrelated to the CounterFact subjects edited here
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "A healthy breakfast usually includes",
    "The theory of relativity was developed by",
    "In the morning, the old fisherman",
    "The main ingredient of bread is",
    "The most spoken language in the world is",
]
REPLAYED_RE = re.compile(r"replayed (\d+) active edits \((\d+) operations verified[^)]*\) to version (\d+) in ([0-9.]+) s")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    ok = host == "localhost"
    if not ok:
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok:
        raise SystemExit(f"--url must point at a loopback address (127.0.0.1, ::1, localhost), got {url!r}")
    return url.rstrip("/")


def http_client(url: str, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, trust_env=False)  # no proxies for loopback


class Service:
    """One `python -m knowpatch serve` subprocess on a free loopback port, output in a log file."""

    threads: int | None = None  # --service-threads: OMP/MKL threads of the services (None: their default)

    def __init__(self, name: str, data_dir: Path, batch_size: int, logs: Path, cache_dir: Path | None = None) -> None:
        self.name, self.data_dir, self.batch_size = name, data_dir, batch_size
        self.cache_dir = cache_dir  # set: a cache of its own and the shipped defaults (the `self` corpus)
        self.started_at: float | None = None  # wall clock (time.time) of the process start
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KNOWPATCH_")}
        env.update({
            "KNOWPATCH_DATA_DIR": str(self.data_dir),
            "KNOWPATCH_BATCH_SIZE": str(self.batch_size),
            "KNOWPATCH_VERSION_WAIT_S": "120",
            "PYTHONUNBUFFERED": "1",
        })
        if self.cache_dir is None:
            env.update({"KNOWPATCH_CORPUS": str(CORPUS), "KNOWPATCH_STATS_TOKENS": "20000"})
        else:
            env["KNOWPATCH_CACHE_DIR"] = str(self.cache_dir)
        if self.threads:
            env.update({"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)})
        return env

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "Service":
        """Start and wait for /ready 200; ready_s = seconds from process start to that answer."""
        out = self.log.open("ab")
        try:
            started = time.monotonic()
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "knowpatch", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=str(ROOT), env=self.env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            out.close()
        deadline = started + timeout_s
        with http_client(self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: knowpatch serve exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    if client.get("/ready").status_code == 200:
                        self.ready_s = time.monotonic() - started
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"{self.name}: not ready after {timeout_s} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def replay_line(self) -> dict | None:
        """The worker's 'replayed N active edits ... in X s' log line of the latest start."""
        found = REPLAYED_RE.findall(self.log.read_text(errors="replace"))
        if not found:
            return None
        edits, ops, version, seconds = found[-1]
        return {"edits": int(edits), "operations": int(ops), "version": int(version), "replay_s": float(seconds)}

    def startup(self) -> dict:
        """Where the start-up went, from the log's timestamps: model load, statistics + null spaces
        (eigendecompositions), context templates (generated text), replay, HTTP up."""
        text = self.log.read_text(errors="replace")
        marks = {}
        for key, pattern in (("model", r"model \S+ loaded"), ("nullspace", r"null space keeps"),
                             ("replayed", r"replayed \d+ active edits")):
            stamps = [m.group(1) for m in re.finditer(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern,
                                                      text, re.MULTILINE)]
            if stamps:
                marks[key] = time.mktime(time.strptime(stamps[-1][:19], "%Y-%m-%d %H:%M:%S")) + int(stamps[-1][20:]) / 1000
        replay = self.replay_line()
        if self.started_at is None or self.ready_s is None or len(marks) < 3 or replay is None:
            return {}
        t0 = self.started_at
        return {
            "load_model_s": marks["model"] - t0,
            "stats_nullspace_s": marks["nullspace"] - marks["model"],
            "templates_s": marks["replayed"] - replay["replay_s"] - marks["nullspace"],
            "replay_s": replay["replay_s"],
            "http_up_s": t0 + self.ready_s - marks["replayed"],
        }

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Services:
    """Every service started, so that all of them are stopped whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Service] = []

    def start(self, name: str, data_dir: Path, batch_size: int) -> Service:
        service = Service(name, data_dir, batch_size, self.logs)
        self.started.append(service)
        return service.start()

    def stop_all(self) -> None:
        for service in reversed(self.started):
            try:
                service.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop {service.name}: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------- edits


def counterfact(start: int, n: int) -> list[dict]:
    rows = json.loads(COUNTERFACT.read_text())
    usable = [r for r in rows if r["subject"] and r["subject"] in r["prompt"]]
    picked = usable[start : start + n]
    if len(picked) < n:
        raise SystemExit(f"CounterFact has only {len(usable)} usable rows; asked for {start}+{n}")
    return [{"subject": r["subject"], "prompt": r["prompt"], "target_new": r["target_new"],
             "target_true": r["ground_truth"], "metadata": {"bench": "service_load", "case_id": r.get("case_id")}}
            for r in picked]


def post_edits(client: httpx.Client, rows: list[dict], list_size: int) -> list[str]:
    """One POST per edit (list_size 1) or per list of list_size edits; the ids in order."""
    ids: list[str] = []
    if list_size <= 1:
        for row in rows:
            r = client.post("/edits", json=row)
            if r.status_code != 202:
                raise RuntimeError(f"POST /edits: {r.status_code} {r.text[:300]}")
            ids.append(r.json()["id"])
        return ids
    for i in range(0, len(rows), list_size):
        r = client.post("/edits", json={"edits": rows[i : i + list_size]})
        if r.status_code != 202:
            raise RuntimeError(f"POST /edits (list): {r.status_code} {r.text[:300]}")
        ids.extend(e["id"] for e in r.json()["edits"])
    return ids


def wait_terminal(client: httpx.Client, ids: list[str], timeout_s: float) -> list[dict]:
    """Poll GET /edits/{id} for the oldest unfinished edit (they finish in ledger order) until all are
    terminal; bounded by timeout_s. Returns the final records."""
    records: list[dict] = []
    deadline = time.monotonic() + timeout_s
    i = 0
    while i < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(ids) - i} of {len(ids)} edits still unfinished after {timeout_s:.0f} s")
        r = client.get(f"/edits/{ids[i]}")
        if r.status_code != 200:
            raise RuntimeError(f"GET /edits/{ids[i]}: {r.status_code} {r.text[:300]}")
        record = r.json()
        if record["status"] in TERMINAL:
            records.append(record)
            i += 1
            continue
        time.sleep(POLL_S)
    return records


def _ts(value: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def edit_throughput(client: httpx.Client, rows: list[dict], list_size: int, timeout_s: float) -> dict:
    """Post all edits at once, time until every one is applied (or failed)."""
    started = time.monotonic()
    ids = post_edits(client, rows, list_size)
    posted_s = time.monotonic() - started
    records = wait_terminal(client, ids, timeout_s)
    elapsed = time.monotonic() - started
    applied = [r for r in records if r["status"] == "applied"]
    failed = [r for r in records if r["status"] == "failed"]
    server_s = None
    if applied:
        server_s = max(_ts(r["applied_at"]) for r in applied) - min(_ts(r["created_at"]) for r in records)
    flips = sum(1 for r in applied if _flipped(r))
    batches = len({r["batch_id"] for r in applied})
    return {
        "edits": len(ids), "applied": len(applied), "failed": len(failed), "batches": batches,
        "elapsed_s": elapsed, "post_s": posted_s, "server_s": server_s,
        "edits_per_min": 60 * len(applied) / elapsed if applied else 0.0,
        "s_per_edit": elapsed / len(applied) if applied else None,
        "flipped": flips, "ids": [r["id"] for r in applied],
        "errors": sorted({(r.get("error") or "")[:120] for r in failed}),
        "last_version": max((r["model_version"] or 0) for r in applied) if applied else None,
    }


def _flipped(record: dict) -> bool:
    """target_new now more likely than target_true on the edit prompt (from the audit metrics)."""
    prompt = (record.get("metrics_after") or {}).get("prompt") or {}
    new, true = prompt.get("target_new"), prompt.get("target_true")
    return new is not None and true is not None and new > true


# --------------------------------------------------------------------------- generation


@dataclass
class LatencyResult:
    clients: int
    latencies_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        per_token = sorted(t / n for t, n in zip(self.latencies_s, self.tokens) if n)
        return {
            "clients": self.clients, "requests": len(lat), "errors": len(self.errors),
            "p50_ms": 1000 * percentile(lat, 50), "p95_ms": 1000 * percentile(lat, 95),
            "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
            "tokens_per_s": sum(self.tokens) / self.wall_s if self.wall_s else None,
            "mean_tokens": statistics.fmean(self.tokens) if self.tokens else None,
            "ms_per_token_p50": 1000 * percentile(per_token, 50),
            "model_versions": sorted(self.versions),
        }


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _generate(client: httpx.Client, prompt: str) -> tuple[float, int, int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}}
    started = time.perf_counter()
    r = client.post("/generate", json=body)
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"POST /generate: {r.status_code} {r.text[:300]}")
    out = r.json()
    return elapsed, int(out["details"]["generated_tokens"]), int(out["model_version"])


def generate_load(url: str, clients: int, requests: int) -> LatencyResult:
    """`requests` greedy /generate calls (rounded up to a multiple of `clients`) from `clients` threads
    that start together; fixed prompts, max_new_tokens 32. One warm-up call first, not counted."""
    per_client = max(1, -(-requests // clients))
    result = LatencyResult(clients)
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client_loop(c: int) -> None:
        with http_client(url, timeout=GENERATE_TIMEOUT_S) as client:
            try:
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                return
            for i in range(per_client):
                prompt = PROMPTS[(i * clients + c) % len(PROMPTS)]
                try:
                    elapsed, tokens, version = _generate(client, prompt)
                except Exception as exc:  # counted, reported
                    with lock:
                        result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    result.latencies_s.append(elapsed)
                    result.tokens.append(tokens)
                    result.versions.add(version)

    with http_client(url, timeout=GENERATE_TIMEOUT_S) as warm:
        _generate(warm, PROMPTS[0])
    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait(timeout=60)
    started = time.perf_counter()
    for t in threads:
        t.join(timeout=GENERATE_TIMEOUT_S * per_client + 60)
    result.wall_s = time.perf_counter() - started
    if any(t.is_alive() for t in threads):
        result.errors.append("a client thread did not finish in time")
    return result


def interleaved(base_url: str, patched_url: str, requests: int) -> dict:
    """One client alternating between a base and a patched service, same prompt for each pair, so that
    load from other work on the machine hits both alike. Warm-up call on each first."""
    lat: dict[str, list[float]] = {"base": [], "patched": []}
    per_token: dict[str, list[float]] = {"base": [], "patched": []}
    with http_client(base_url, timeout=GENERATE_TIMEOUT_S) as base, \
            http_client(patched_url, timeout=GENERATE_TIMEOUT_S) as patched:
        clients = {"base": base, "patched": patched}
        for client in clients.values():
            _generate(client, PROMPTS[0])
        for i in range(requests):
            order = ("base", "patched") if i % 2 == 0 else ("patched", "base")
            for name in order:
                elapsed, tokens, _ = _generate(clients[name], PROMPTS[i % len(PROMPTS)])
                lat[name].append(elapsed)
                if tokens:
                    per_token[name].append(elapsed / tokens)
    p50 = {k: percentile(v, 50) for k, v in lat.items()}
    pairs = sorted(p / b for p, b in zip(lat["patched"], lat["base"]))
    return {"requests": requests, "base_p50_ms": 1000 * p50["base"], "patched_p50_ms": 1000 * p50["patched"],
            "base_p95_ms": 1000 * percentile(lat["base"], 95), "patched_p95_ms": 1000 * percentile(lat["patched"], 95),
            "ratio": p50["patched"] / p50["base"], "pair_ratio_median": percentile(pairs, 50),
            "ms_per_token_ratio": percentile(per_token["patched"], 50) / percentile(per_token["base"], 50)}


CLIENTS = (1, 8, 32)  # concurrent clients of the base model's latency phases (the patched one: 1 and 8)


def latency_set(url: str, requests: int, clients: tuple[int, ...] = CLIENTS, rounds: int = 1) -> dict[int, dict]:
    """Each client count's phase, in `rounds` interleaved rounds of requests/rounds requests each (so that
    load from other work drifting during the run hits every count alike), merged: latencies pooled,
    tokens/s = all tokens / all wall time of that count."""
    merged = {n: LatencyResult(n) for n in clients}
    for _ in range(rounds):
        for n in clients:
            part = generate_load(url, n, max(1, requests // rounds))
            total = merged[n]
            total.latencies_s += part.latencies_s
            total.tokens += part.tokens
            total.versions |= part.versions
            total.wall_s += part.wall_s
            total.errors += part.errors
    summaries = {}
    for n, result in merged.items():
        summaries[n] = result.summary() | ({"first_error": result.errors[0]} if result.errors else {})
    return summaries


# --------------------------------------------------------------------------- rollback


def wait_idle(client: httpx.Client, timeout_s: float = 120) -> float:
    """Until GET /info shows no queued message and no pending operation: the worker finishes an op's
    in-memory bookkeeping after the ledger already shows it done, and acknowledges only then."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        info = client.get("/info").json()
        if info.get("queue_depth") == 0 and info.get("pending_operations") in (0, None):
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"the worker is still busy after {timeout_s} s")


def rollback_latency(client: httpx.Client, edit_ids: list[str], timeout_s: float = 300) -> tuple[list[float], list[float]]:
    """With the worker idle, POST /edits/{id}/rollback, then GET every 50 ms until rolled_back; seconds
    per rollback, as the client saw it and as the server recorded it (rollback_requested -> rolled_back_at).
    Back to back, a rollback would also wait for the previous one's bookkeeping (see wait_idle)."""
    times, server = [], []
    for edit_id in edit_ids:
        wait_idle(client)
        started = time.monotonic()
        r = client.post(f"/edits/{edit_id}/rollback", json={"reason": "bench/service_load.py rollback latency"})
        if r.status_code != 202:
            raise RuntimeError(f"POST /edits/{edit_id}/rollback: {r.status_code} {r.text[:300]}")
        deadline = started + timeout_s
        while True:
            record = client.get(f"/edits/{edit_id}").json()
            status = record["status"]
            if status == "rolled_back":
                times.append(time.monotonic() - started)
                asked = [e["at"] for e in record["history"] if e["event"] == "rollback_requested"]
                if asked and record.get("rolled_back_at"):
                    server.append(_ts(record["rolled_back_at"]) - _ts(asked[-1]))
                break
            if status != "applied" or time.monotonic() > deadline:
                raise RuntimeError(f"rollback of {edit_id}: status {status} after {time.monotonic() - started:.1f} s")
            time.sleep(ROLLBACK_POLL_S)
    return times, server


# --------------------------------------------------------------------------- phases


def fill_synthetic(specs: list[tuple[Path, int]], env: dict[str, str], log: Path, timeout_s: float = 1800) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "bench" / "_ledger_fill.py"), "--batch", "8"]
    for data_dir, n in specs:
        cmd += ["--ledger", f"{data_dir}:{n}"]
    with log.open("ab") as err:
        done = subprocess.run(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=err,
                              stdin=subprocess.DEVNULL, timeout=timeout_s, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench/_ledger_fill.py exited with {done.returncode}; see {log}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def restart_phase(services: Services, work: Path, sizes: list[int], repeats: int, log) -> dict:
    """Synthetic ledgers of each size; time from process start to /ready 200, interleaved repeats."""
    specs = [(work / f"synthetic-{n}", n) for n in sizes]
    env = Service("fill", work, 8, services.logs).env()
    log(f"filling synthetic ledgers {sizes} ...")
    filled = fill_synthetic(specs, env, services.logs / "ledger_fill.log")
    for f in filled:
        log(f"  synthetic ledger {f['edits']:5d} edits: {f['db_bytes'] / 1e6:.1f} MB, filled in {f['fill_s']} s")
    times: dict[int, list[float]] = {n: [] for n in sizes}
    parts: dict[int, list[dict]] = {n: [] for n in sizes}
    for rep in range(repeats):
        for data_dir, n in specs:
            service = services.start(f"restart-{n}-{rep}", data_dir, 8)
            try:
                line = service.replay_line()
                if line is None or line["edits"] != n:
                    raise RuntimeError(f"restart-{n}: expected a replay of {n} edits, log says {line}")
                times[n].append(service.ready_s)
                parts[n].append(service.startup() or {"replay_s": line["replay_s"]})
                log(f"  restart with {n:5d} synthetic edits: ready in {service.ready_s:.2f} s ({_parts(parts[n][-1])})")
            finally:
                service.stop()
    return {n: {"ready_s": statistics.median(times[n]), "ready_s_all": times[n],
                **{k: statistics.median(p[k] for p in parts[n]) for k in parts[n][0] if all(k in p for p in parts[n])},
                "db_mb": next(f["db_bytes"] for f in filled if f["edits"] == n) / 1e6}
            for n in sizes}


STARTUP_PARTS = (("load_model_s", "model"), ("stats_nullspace_s", "stats+null space"), ("templates_s", "templates"),
                 ("replay_s", "replay"), ("http_up_s", "http"))


def _parts(d: dict) -> str:
    return ", ".join(f"{label} {d[k]:.2f}" for k, label in STARTUP_PARTS if k in d)


def http_phases(url: str, args, log, single_posts: bool, base_service=None) -> dict:
    """Everything measured over HTTP against one service (single_posts: also the batch-1 style edits)."""
    out: dict = {}
    with http_client(url) as client:
        if single_posts:  # --url: single posts on the same service, whatever its batch size
            log(f"edits through the queue, {args.edits_b1} single POSTs ...")
            out["b1"] = edit_throughput(client, counterfact(args.cf_offset, args.edits_b1), 1, args.edit_timeout_s)
        log(f"base /generate latency, {args.requests} requests at {CLIENTS} clients ...")
        out["base"] = latency_set(url, args.requests, rounds=args.rounds)
        log(f"edits through the queue, {args.edits_b8} edits in lists of 8 ...")
        out["b8"] = edit_throughput(client, counterfact(args.cf_offset + 1000, args.edits_b8), 8, args.edit_timeout_s)
        more = max(0, args.patched_edits - out["b8"]["applied"])
        if more:
            log(f"applying {more} more edits (lists of 8) to reach {args.patched_edits} patched ...")
            out["patch_fill"] = edit_throughput(client, counterfact(args.cf_offset + 2000, more), 8, args.edit_timeout_s)
        applied_ids = out["b8"]["ids"] + out.get("patch_fill", {}).get("ids", [])
        out["patched_edits"] = len(applied_ids)
        log(f"patched /generate latency ({len(applied_ids)} edits applied) ...")
        out["patched"] = latency_set(url, args.requests, (1, 8), rounds=args.rounds)
        if base_service is not None:
            base = base_service()
            try:
                log(f"base service ready in {base.ready_s:.1f} s; interleaved base/patched /generate at 1 client, "
                    f"{args.requests} pairs ...")
                out["ab"] = interleaved(base.url, url, args.requests)
            finally:
                base.stop()
        log(f"rollback latency, {args.rollbacks} rollbacks ...")
        out["rollback_s"], out["rollback_server_s"] = (
            rollback_latency(client, applied_ids[-args.rollbacks:]) if args.rollbacks else ([], []))
    return out


def first_start_phase(services: Services, work: Path, log) -> dict:
    """The embedded default's first start with an empty cache (GGUF conversion, the self corpus,
    key statistics, null spaces), process start to /ready 200, then a warm restart on that cache."""
    cache, data = work / "cache-first-start", work / "data-first-start"
    service = Service("first-start", data, 8, services.logs, cache_dir=cache)
    services.started.append(service)
    log("first start of the shipped defaults with an empty cache (model conversion, self corpus, statistics) ...")
    service.start()
    first = service.ready_s
    log(f"first start ready in {first:.1f} s; warm restart ...")
    service.stop()
    service.start()
    log(f"warm restart ready in {service.ready_s:.1f} s")
    service.stop()
    return {"first_start_s": first, "warm_restart_s": service.ready_s}


def generation_phases(services: Services, work: Path, args, log) -> dict:
    """--generation-only: a base service (1/8/32 clients), then a patched one replaying a synthetic
    ledger (1/8 clients), then the interleaved patched/base comparison with both running."""
    out: dict = {}
    base = services.start("base", work / "data-base", 8)
    log(f"base service ready in {base.ready_s:.1f} s; /generate latency, {args.requests} requests at {CLIENTS} "
        "clients ...")
    out["base"] = latency_set(base.url, args.requests, rounds=args.rounds)
    log(f"filling a SYNTHETIC ledger of {args.patched_edits} edits for the patched service ...")
    data = work / "data-patched"
    filled = fill_synthetic([(data, args.patched_edits)], Service("fill", work, 8, services.logs).env(),
                            services.logs / "ledger_fill.log")
    out["patched_edits"] = filled[0]["edits"]
    patched = services.start("patched", data, 8)
    log(f"patched service ({out['patched_edits']} synthetic edits) ready in {patched.ready_s:.1f} s; /generate "
        "latency at 1 and 8 clients ...")
    out["patched"] = latency_set(patched.url, args.requests, (1, 8), rounds=args.rounds)
    log(f"interleaved base/patched /generate at 1 client, {args.requests} pairs ...")
    out["ab"] = interleaved(base.url, patched.url, args.requests)
    return out


def run(args) -> dict:
    mode = "url" if args.url else "generation-only" if args.generation_only else "embedded"
    results: dict = {"mode": mode, "args": {
        k: getattr(args, k) for k in ("edits_b1", "edits_b8", "patched_edits", "requests", "rollbacks", "cf_offset",
                                      "restart_repeats", "service_threads", "quick", "generation_only",
                                      "rounds", "first_start", "first_start_only")}}
    started = time.monotonic()

    loads = results.setdefault("load1", [])

    def log(msg: str) -> None:  # with the 1-minute load average: other work on the machine skews everything
        load = os.getloadavg()[0]
        loads.append(round(load, 2))
        print(f"[{time.monotonic() - started:7.1f} s, load {load:4.2f}] {msg}", flush=True)

    if args.url:
        url = check_loopback(args.url)
        log(f"driving the running service at {url} (its worker batch size is its own; restart not measured)")
        with http_client(url) as client:
            if client.get("/ready").status_code != 200:
                raise SystemExit(f"{url}/ready is not 200")
            head = (client.get("/info").json().get("ledger_head") or {}).get("seq") or 0
        if args.cf_offset is None:  # facts this service may hold already converge in a few steps: take others
            args.cf_offset = (3 * head) % 6000
        results["args"]["cf_offset"] = args.cf_offset
        results["start_version"] = head
        log(f"ledger head {head}; CounterFact rows from offset {args.cf_offset}")
        results.update(http_phases(url, args, log, single_posts=True))
        return results

    if args.cf_offset is None:
        args.cf_offset = 0
    results["args"]["cf_offset"] = args.cf_offset
    work = Path(tempfile.mkdtemp(prefix="knowpatch-bench-"))
    logs = work / "logs"
    logs.mkdir()
    log(f"work folder {work} (service logs in {logs})")
    services = Services(logs)
    ok = False
    if args.first_start_only:
        try:
            results["first_start"] = first_start_phase(services, work, log)
            ok = True
        finally:
            services.stop_all()
            if ok and not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"kept {work} (logs in {logs})", file=sys.stderr)
        return results
    if args.generation_only:
        try:
            results.update(generation_phases(services, work, args, log))
            if args.first_start:
                results["first_start"] = first_start_phase(services, work, log)
            ok = True
        finally:
            services.stop_all()
            if ok and not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"kept {work} (logs in {logs})", file=sys.stderr)
        return results
    try:
        # batch size 1: single POSTs
        b1 = services.start("b1", work / "data-b1", 1)
        log(f"batch-1 service ready in {b1.ready_s:.1f} s; {args.edits_b1} edits, one POST each ...")
        with http_client(b1.url) as client:
            results["b1"] = edit_throughput(client, counterfact(args.cf_offset, args.edits_b1), 1, args.edit_timeout_s)
        b1.stop()
        # batch size 8: base latency, edits in lists, patched latency, rollbacks
        b8 = services.start("b8", work / "data-b8", 8)
        log(f"batch-8 service ready in {b8.ready_s:.1f} s")
        results.update(http_phases(b8.url, args, log, single_posts=False,
                                   base_service=lambda: services.start("base", work / "data-base", 8)))
        b8.stop()
        # the real ledger of the batch-8 phase, restarted
        real = services.start("restart-real", work / "data-b8", 8)
        results["restart_real"] = {"ready_s": real.ready_s, **(real.replay_line() or {}), **real.startup()}
        log(f"restart with the real ledger ({results['restart_real'].get('edits')} active edits): "
            f"ready in {real.ready_s:.2f} s")
        real.stop()
        # synthetic ledgers
        results["restart"] = restart_phase(services, work, [0, 100, 1000], args.restart_repeats, log)
        if args.first_start:
            results["first_start"] = first_start_phase(services, work, log)
        ok = True
    finally:
        services.stop_all()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (logs in {logs})", file=sys.stderr)
    return results


# --------------------------------------------------------------------------- report


def _f(x, width: int, nd: int) -> str:
    return f"{'n/a':>{width}s}" if x is None else f"{x:{width}.{nd}f}"


def _r(x, nd=1):
    return None if x is None else round(x, nd)


def report_first_start(res: dict) -> dict:
    first = res["first_start"]
    print(f"first start, empty cache, shipped defaults: ready in {first['first_start_s']:.1f} s (wanted <= 180 quiet); "
          f"warm restart {first['warm_restart_s']:.1f} s (wanted <= 8); 1-minute load up to {max(res['load1']):.2f}")
    return {"first_start_s": _r(first["first_start_s"]), "warm_restart_s": _r(first["warm_restart_s"], 2),
            "load1_max": max(res["load1"]), "mode": res["mode"], "args": res["args"]}


def report(res: dict) -> dict:
    if "base" not in res:
        return report_first_start(res)
    base, patched = res["base"], res["patched"]
    seq_ratio = patched[1]["p50_ms"] / base[1]["p50_ms"] if base[1]["p50_ms"] and patched[1]["p50_ms"] else None
    ab = res.get("ab")
    ratio = ab["ratio"] if ab else seq_ratio  # the interleaved comparison where there is one
    ratio8 = patched[8]["p50_ms"] / base[8]["p50_ms"] if base[8]["p50_ms"] and patched[8]["p50_ms"] else None
    tok_ratio = (patched[1]["ms_per_token_p50"] / base[1]["ms_per_token_p50"]
                 if base[1]["ms_per_token_p50"] and patched[1]["ms_per_token_p50"] else None)
    rollback = res.get("rollback_s") or []
    restart = res.get("restart") or {}
    lines = []
    add = lines.append
    add("")
    add(f"knowpatch service load ({res['mode']}; SmolLM2-135M, {os.cpu_count()} CPUs, load avg "
        f"{os.getloadavg()[0]:.2f})")
    add("-" * 96)
    url_mode = res["mode"] == "url"
    if url_mode:
        add(f"(driving a running service: its own worker batch size; 'before' is its state at version "
            f"{res.get('start_version')}, not necessarily the base model)")
    for key, label in (("b1", "edits, single POSTs" + (" (service's batch size)" if url_mode else ", worker batch 1")),
                       ("b8", "edits, lists of 8" + (" (service's batch size)" if url_mode else ", worker batch 8")),
                       ("patch_fill", "edits, filling to the patched state")):
        e = res.get(key)
        if e:
            add(f"{label:44s} {e['edits_per_min']:7.2f} edits/min   {e['applied']}/{e['edits']} applied, "
                f"{e['failed']} failed, {e['batches']} batches, {e['elapsed_s']:.1f} s "
                f"({e['s_per_edit'] or 0:.2f} s/edit), {e['flipped']} flipped")
    add("")
    add(f"{'/generate (32 new tokens, greedy)':36s} {'clients':>7s} {'p50 ms':>9s} {'p95 ms':>9s} "
        f"{'tokens/s':>9s} {'ms/token':>9s} {'tokens':>7s} {'n':>4s} {'versions'}")
    synthetic = " SYNTHETIC" if res["mode"] == "generation-only" else ""
    names = (("before", f"after {res.get('patched_edits')} more edits") if url_mode
             else ("base model", f"patched ({res.get('patched_edits')}{synthetic} edits)"))
    for name, data in zip(names, (base, patched)):
        for c in sorted(data):
            d = data[c]
            add(f"{name:36s} {c:7d} {_f(d['p50_ms'], 9, 0)} {_f(d['p95_ms'], 9, 0)} {_f(d['tokens_per_s'], 9, 1)} "
                f"{_f(d['ms_per_token_p50'], 9, 1)} {_f(d['mean_tokens'], 7, 1)} {d['requests']:4d} {d['model_versions']}"
                + (f"  ERRORS {d['errors']}: {d.get('first_error')}" if d["errors"] else ""))
    speedup8, speedup32, tail8 = batching_ratios(base)
    add(f"continuous batching, base model: tokens/s at 8 clients / 1 client {_f(speedup8, 0, 2)} (wanted >= 5), "
        f"at 32 / at 8 {_f(speedup32, 0, 2)} (wanted >= 1), p95 at 8 / p50 at 1 {_f(tail8, 0, 2)} (wanted <= 3)")
    add(f"patched / base p50 latency, measured one after the other: {_f(seq_ratio, 0, 3)} at 1 client, "
        f"{_f(ratio8, 0, 3)} at 8 clients (per token at 1 client: {_f(tok_ratio, 0, 3)})")
    if ab:
        add(f"patched / base p50 latency, interleaved (a base service beside the patched one, one client "
            f"alternating, {ab['requests']} pairs): {ab['ratio']:.3f} (base {ab['base_p50_ms']:.0f} ms, patched "
            f"{ab['patched_p50_ms']:.0f} ms; median pair ratio {ab['pair_ratio_median']:.3f}, per token "
            f"{ab['ms_per_token_ratio']:.3f})")
    add("")
    if rollback:
        add(f"rollback (POST -> GET shows rolled_back)   median {1000 * statistics.median(rollback):.0f} ms over "
            f"{len(rollback)}: {', '.join(f'{1000 * t:.0f}' for t in rollback)} ms (polling every "
            f"{1000 * ROLLBACK_POLL_S:.0f} ms; server-side "
            f"{', '.join(f'{1000 * t:.0f}' for t in res.get('rollback_server_s') or [])} ms)")
    if res.get("restart_real"):
        rr = res["restart_real"]
        add(f"restart, real ledger of {rr.get('edits')} active edits ({rr.get('operations')} ops): "
            f"ready in {rr['ready_s']:.2f} s ({_parts(rr)})")
    for n, d in sorted(restart.items()):
        add(f"restart, SYNTHETIC ledger of {n:4d} edits ({d['db_mb']:5.1f} MB): ready in {d['ready_s']:.2f} s, "
            f"median of {', '.join(f'{t:.2f}' for t in d['ready_s_all'])} ({_parts(d)})")
    if restart:
        add("  (the 0/100/1000 restart ledgers are synthetic: random rank-one factors written through the real "
            "ledger functions, verified by the real replay)")
    loads = res.get("load1") or []
    if loads:
        add(f"1-minute load average during the run: {min(loads):.2f} .. {max(loads):.2f} on {os.cpu_count()} CPUs "
            "(the service alone keeps it near the CPU count, 8 clients somewhat above; much more means other work)")
    add("-" * 96)
    print("\n".join(lines))
    b1 = res.get("b1") or {}
    b8 = res.get("b8") or {}
    summary = {
        "edits_per_min_b1": _r(b1.get("edits_per_min"), 2),
        "edits_per_min_b8": _r(b8.get("edits_per_min"), 2),
        "generate_p50_ms": _r(base[1]["p50_ms"]),
        "generate_p95_ms": _r(base[1]["p95_ms"]),
        "generate_tokens_per_s_1": _r(base[1]["tokens_per_s"], 2),
        "generate_tokens_per_s_8": _r(base[8]["tokens_per_s"], 2),
        "tokens_per_s_1": _r(base[1]["tokens_per_s"], 2),
        "tokens_per_s_8": _r(base[8]["tokens_per_s"], 2),
        "tokens_per_s_32": _r(base.get(32, {}).get("tokens_per_s"), 2),
        "generate_p50_ms_32": _r(base.get(32, {}).get("p50_ms")),
        "generate_p95_ms_32": _r(base.get(32, {}).get("p95_ms")),
        "tokens_per_s_8_over_1": _r(speedup8, 2),
        "tokens_per_s_32_over_8": _r(speedup32, 2),
        "p95_8_over_p50_1": _r(tail8, 2),
        "generate_p50_ms_8": _r(base[8]["p50_ms"]),
        "generate_p95_ms_8": _r(base[8]["p95_ms"]),
        "patched_generate_p50_ms": _r(patched[1]["p50_ms"]),
        "patched_generate_p95_ms": _r(patched[1]["p95_ms"]),
        "patched_generate_tokens_per_s_1": _r(patched[1]["tokens_per_s"], 2),
        "patched_generate_tokens_per_s_8": _r(patched[8]["tokens_per_s"], 2),
        "patched_over_base_latency_ratio": _r(ratio, 3),
        "patched_over_base_latency_ratio_source": "interleaved" if ab else "sequential",
        "patched_over_base_latency_ratio_sequential": _r(seq_ratio, 3),
        "patched_over_base_pair_ratio_median": _r(ab["pair_ratio_median"], 3) if ab else None,
        "patched_over_base_latency_ratio_8": _r(ratio8, 3),
        "patched_over_base_ms_per_token_ratio": _r(tok_ratio, 3),
        "patched_edits": res.get("patched_edits"),
        "rollback_ms": _r(1000 * statistics.median(rollback)) if rollback else None,
        "restart_s_0": _r(restart.get(0, {}).get("ready_s"), 2),
        "restart_s_100": _r(restart.get(100, {}).get("ready_s"), 2),
        "restart_s_1000": _r(restart.get(1000, {}).get("ready_s"), 2),
        "rollback_server_ms": _r(1000 * statistics.median(res["rollback_server_s"]))
        if res.get("rollback_server_s") else None,
        "replay_s_0": _r(restart.get(0, {}).get("replay_s"), 2),
        "replay_s_100": _r(restart.get(100, {}).get("replay_s"), 2),
        "replay_s_1000": _r(restart.get(1000, {}).get("replay_s"), 2),
        "restart_ledgers_synthetic": bool(restart),
        "restart_s_real": _r((res.get("restart_real") or {}).get("ready_s"), 2),
        "restart_real_edits": (res.get("restart_real") or {}).get("edits"),
        "startup_parts_s_1000": {k: _r(v, 2) for k, v in restart.get(1000, {}).items()
                                 if k in dict(STARTUP_PARTS)} or None,
        "first_start_s": _r((res.get("first_start") or {}).get("first_start_s")),
        "warm_restart_s": _r((res.get("first_start") or {}).get("warm_restart_s"), 2),
        "load1_max": max(res.get("load1") or [0]),
        "edits_failed": sum((res.get(k) or {}).get("failed", 0) for k in ("b1", "b8", "patch_fill")),
        "mode": res["mode"],
        "args": res["args"],
    }
    return summary


def batching_ratios(base: dict) -> tuple[float | None, float | None, float | None]:
    """tokens/s at 8 clients over 1 client, at 32 over 8, and p95 latency at 8 over p50 at 1."""
    def ratio(a, b):
        return a / b if a and b else None
    tokens = {c: base.get(c, {}).get("tokens_per_s") for c in CLIENTS}
    return (ratio(tokens[8], tokens[1]), ratio(tokens[32], tokens[8]),
            ratio(base.get(8, {}).get("p95_ms"), base.get(1, {}).get("p50_ms")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="drive this running service (loopback only) instead of starting one; "
                                      "restart is not measured then")
    parser.add_argument("--edits-b1", type=int, default=8, help="edits at worker batch size 1")
    parser.add_argument("--edits-b8", type=int, default=16, help="edits at worker batch size 8 (lists of 8)")
    parser.add_argument("--patched-edits", type=int, default=100,
                        help="edits applied (at batch size 8, the b8 ones included) before the patched latency")
    parser.add_argument("--requests", type=int, default=24, help="/generate requests per latency phase")
    parser.add_argument("--rollbacks", type=int, default=3)
    parser.add_argument("--restart-repeats", type=int, default=2)
    parser.add_argument("--edit-timeout-s", type=float, default=None,
                        help="bound on waiting for one group of edits (default 300 s + 60 s per edit)")
    parser.add_argument("--service-threads", type=int, default=None,
                        help="OMP_NUM_THREADS/MKL_NUM_THREADS of the started services (default: torch's own)")
    parser.add_argument("--cf-offset", type=int, default=None,
                        help="first CounterFact row (default 0; with --url, from the ledger head, so that a rerun "
                             "does not re-edit facts the service holds already)")
    parser.add_argument("--quick", action="store_true", help="small numbers, for a smoke run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="latency phases in this many interleaved rounds (1, 8, 32 clients, again ...), for "
                             "a machine whose other load drifts")
    parser.add_argument("--generation-only", action="store_true",
                        help="only generation latency/throughput and patched/base (synthetic patched ledger); "
                             "no edits, rollbacks or restarts")
    parser.add_argument("--first-start", action="store_true",
                        help="also measure the first start of the shipped defaults with an empty cache (model "
                             "conversion, self corpus, statistics: minutes) and a warm restart")
    parser.add_argument("--first-start-only", action="store_true", help="only the first-start measurement")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (ledgers, logs)")
    args = parser.parse_args()
    if args.url and args.generation_only:
        parser.error("--generation-only starts its own services; it does not take --url")
    Service.threads = args.service_threads
    if args.quick:
        args.edits_b1, args.edits_b8, args.patched_edits = 2, 8, 8
        args.requests, args.rollbacks, args.restart_repeats = 8, 1, 1
    for name in ("edits_b1", "edits_b8", "requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.rollbacks = max(0, min(args.rollbacks, max(args.patched_edits, args.edits_b8)))
    if args.edit_timeout_s is None:
        args.edit_timeout_s = 300 + 60 * max(args.edits_b1, args.edits_b8, args.patched_edits)
    if not args.url and not (CORPUS.exists() and COUNTERFACT.exists()):
        raise SystemExit(f"missing {CORPUS} or {COUNTERFACT}")

    def on_term(signum, frame):  # turn SIGTERM into an exception, so the finally blocks stop the services
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    results = run(args)
    summary = report(results)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
