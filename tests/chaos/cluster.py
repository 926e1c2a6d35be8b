"""The split deployment as real processes, for fault trials: `knowpatch api` and `knowpatch worker` on a
tiny random Llama (saved as a Hugging Face folder, so the worker loads it like any model), a Postgres
of their own (a throwaway cluster, initdb into a temporary folder, on a free port, so that stopping it
never touches the machine's shared server; or, where initdb is missing, a database of their own on the
shared server), and a redis-server of their own on a private port, so that killing it never touches the
Redis other tests use. Shared by tests/chaos and bench/chaos.py.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import PG_ADMIN_URL, TEST_CACHE, small_text
from tests.e2e.conftest import Process, free_port

# The tiny model's editing settings: the API and worker tests' (tests/api/conftest.py), as environment.
TINY_SETTINGS = {"KNOWPATCH_LAYERS": "[1,2,3]", "KNOWPATCH_STATS_TOKENS": "64", "KNOWPATCH_NULLSPACE_THRESHOLD": "1e-9"}
START_S = 600.0  # a tiny-model process starts in seconds, but minutes on a 2-core machine under heavy load


def tiny_model_dir() -> Path:
    """The tests' tiny random Llama (tests.engine.conftest.tiny_model, SmolLM2 tokenizer) saved once in
    the test cache as a model folder that KNOWPATCH_MODEL can name."""
    target = TEST_CACHE / "models" / "tiny-llama-chaos"
    if (target / "config.json").is_file():
        return target
    from service.model.loading import load_model
    from tests.engine.conftest import tiny_model

    tokenizer = load_model("smollm2", cache_dir=TEST_CACHE).tokenizer
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny_model("llama", tokenizer).model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process saved the same model first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def wait_for(check, what: str, timeout_s: float, poll_s: float = 0.1):
    """check()'s first truthy value, polled; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(poll_s)


class RedisServer:
    """A redis-server of our own on a private port, in memory only (no RDB, no AOF): a kill loses
    everything it held, as a restarted or flushed production Redis would."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self._pings, f"redis-server on port {self.port} answers", 30)
        return self

    def _pings(self) -> bool:
        import redis

        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.log.read_text(errors='replace')[-2000:]}")
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, everything in memory is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    def stop(self) -> None:
        self.kill()


class Database:
    """A Postgres database of our own on the shared server, dropped at close()."""

    def __init__(self) -> None:
        import psycopg
        from psycopg import sql
        from sqlalchemy.engine import URL

        self.name = f"kp_chaos_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
            info = admin.info
            self.url = URL.create("postgresql+psycopg", username=info.user, password=info.password or None,
                                  host=info.host, port=info.port, database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))


class PostgresMissing(RuntimeError):
    """A private Postgres cluster cannot be made here (no initdb/pg_ctl, or nobody to run them as)."""


def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl: on the PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                        if p.parent.name.isdigit() else 0)
    for folder in reversed(candidates):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresMissing("initdb and pg_ctl are neither on the PATH nor in /usr/lib/postgresql/*/bin: install the "
                          "PostgreSQL server package (e.g. apt-get install postgresql) for the Postgres-outage trials")


class PrivatePostgres:
    """A throwaway Postgres cluster of our own: `initdb -A trust` into a temporary folder, one server on a
    free port of 127.0.0.1 with its unix socket in that folder, so stopping it never touches the
    machine's shared server. As root, initdb and the server run as the `postgres` user (Postgres refuses
    to run as root). drop() stops it and deletes the folder."""

    DATABASE = "knowpatch"

    def __init__(self) -> None:
        import pwd

        self.bin = postgres_bin()
        self.user: int | None = None  # run as this uid (root only)
        self.group: int | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresMissing("running as root and there is no `postgres` user to run initdb as") from None
            self.user, self.group = entry.pw_uid, entry.pw_gid
        self.folder = Path(tempfile.mkdtemp(prefix="knowpatch-pg-"))
        if self.user is not None:
            os.chown(self.folder, self.user, self.group)
        self.data, self.log = self.folder / "data", self.folder / "postgres.log"
        self.port = free_port()
        self.stops: list[str] = []  # the modes of the stops so far
        try:
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
            self.start()
            import psycopg

            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as admin:
                admin.execute(f"CREATE DATABASE {self.DATABASE}")
        except BaseException:
            self.drop()
            raise
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.DATABASE}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str, timeout_s: float = 120) -> None:
        done = subprocess.run([str(self.bin / program), *args], **self._as_owner(), capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"{program} {' '.join(args)} failed ({done.returncode}): "
                                 f"{(done.stdout + done.stderr)[-2000:]}\n{self.tail()}")

    def _as_owner(self) -> dict:
        """subprocess arguments that run a program as the cluster's owner, in its folder."""
        owner = {"user": self.user, "group": self.group, "extra_groups": []} if self.user is not None else {}
        return owner | {"cwd": self.folder}

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> None:
        """Start the server and wait until it accepts connections (after a crash: once WAL recovery ends)."""
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=40"
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120", "-o", options,
                  timeout_s=150)

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast (open connections cut, a clean shutdown) or -m immediate (every server
        process killed at once, as in a crash: WAL recovery at the next start)."""
        assert mode in ("fast", "immediate"), mode
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "120", timeout_s=150)
        self.stops.append(mode)

    def running(self) -> bool:
        return subprocess.run([str(self.bin / "pg_ctl"), "status", "-D", str(self.data)], **self._as_owner(),
                              capture_output=True).returncode == 0

    def drop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate", "-w"],
                           **self._as_owner(), capture_output=True, timeout=150)
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class Keys:
    """Fresh random API keys per cluster, so that a key found in a log or a reply is certainly a leak."""

    writer: str  # edits:write, generate
    admin: str  # edits:admin (implies edits:write)
    generator: str  # generate only
    everything: str  # every scope: the fuzzer's

    @classmethod
    def fresh(cls) -> "Keys":
        return cls(*(f"kp-{role}-{secrets.token_urlsafe(18)}" for role in ("writer", "admin", "gen", "all")))

    def setting(self) -> str:
        return (f"writer:{self.writer}:edits:write,generate;admin:{self.admin}:edits:admin;"
                f"gen:{self.generator}:generate;all:{self.everything}:edits:admin,generate")

    def all(self) -> list[str]:
        return [self.writer, self.admin, self.generator, self.everything]


class Cluster:
    """API + worker + own Postgres + own redis-server. The API keeps running across worker, Redis and
    Postgres restarts, as in production (only the API-kill trial restarts it, as its supervisor would);
    the tests drive it over HTTP and read the ledger directly."""

    def __init__(self, workdir: Path, *, batch_size: int = 4, version_wait_s: float = 1.0,
                 max_new_tokens_limit: int = 16, postgres: str = "auto") -> None:
        """postgres: 'private' (a throwaway cluster of our own, PrivatePostgres, which the Postgres-outage
        trials need), 'shared' (a database on the shared server) or 'auto' (private where initdb is
        available, else shared; `private_postgres_missing` then says why)."""
        from service.ledger.db import make_engine, migrate, session_factory

        assert postgres in ("auto", "private", "shared"), postgres
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.keys = Keys.fresh()
        self.internal_token = f"kp-internal-{secrets.token_urlsafe(18)}"  # the API's key to the worker's routes
        self.private_postgres: PrivatePostgres | None = None
        self.private_postgres_missing: str | None = None
        if postgres != "shared":
            try:
                self.private_postgres = PrivatePostgres()
            except PostgresMissing as exc:
                if postgres == "private":
                    raise
                self.private_postgres_missing = str(exc)
        self.database: Database | PrivatePostgres = self.private_postgres or Database()
        self.redis = RedisServer(workdir / "redis").start()
        self.api_port, self.worker_port = free_port(), free_port()
        self.cache_dir = workdir / "cache"  # statistics of the tiny model (cheap) and the factor-store snapshot
        stream = f"kp-chaos-{uuid.uuid4().hex[:8]}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KNOWPATCH_")} | TINY_SETTINGS | {
            "KNOWPATCH_MODEL": str(tiny_model_dir()),
            "KNOWPATCH_CORPUS": str(small_text()),
            "KNOWPATCH_CACHE_DIR": str(self.cache_dir),
            "KNOWPATCH_DATA_DIR": str(workdir / "data"),
            "KNOWPATCH_DATABASE_URL": self.database.url,
            "KNOWPATCH_REDIS_URL": self.redis.url,
            "KNOWPATCH_QUEUE_STREAM": stream,
            "KNOWPATCH_QUEUE_GROUP": f"{stream}-group",
            "KNOWPATCH_WORKER_PORT": str(self.worker_port),
            "KNOWPATCH_WORKER_URL": f"http://127.0.0.1:{self.worker_port}",
            "KNOWPATCH_API_KEYS": self.keys.setting(),
            "KNOWPATCH_INTERNAL_TOKEN": self.internal_token,
            "KNOWPATCH_BATCH_SIZE": str(batch_size),
            "KNOWPATCH_VERSION_WAIT_S": str(version_wait_s),  # fuzzed future versions wait this long for a 503
            "KNOWPATCH_MAX_NEW_TOKENS_LIMIT": str(max_new_tokens_limit),  # keeps fuzzed generations short
            "OMP_NUM_THREADS": "1",  # a tiny model on a shared 2-core machine: one thread is fastest
            "PYTHONUNBUFFERED": "1",
        }
        migrate(self.database.url)
        self.engine = make_engine(self.database.url)
        self.sessions = session_factory(self.engine)
        self.api: Process | None = None
        self.worker: Process | None = None
        self.worker_starts = 0
        self.api_starts = 0
        self._clients: dict[str | None, httpx.Client] = {}

    # ---- processes ---------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def worker_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}"

    @property
    def api_log(self) -> Path:
        return self.workdir / "api.log"

    @property
    def worker_log(self) -> Path:
        return self.workdir / "worker.log"

    def start_api(self, fault: str | None = None) -> Process:
        """An API process (with KNOWPATCH_FAULT_INJECTION=fault), returned once it serves /health."""
        assert not self.api_alive(), "an API is still running"
        env = self.env | ({"KNOWPATCH_FAULT_INJECTION": fault} if fault else {})
        self.api = Process(["api", "--port", str(self.api_port)], env, self.api_log)
        self.api_starts += 1
        return self.api.start(f"{self.api_url}/health", START_S)

    def api_alive(self) -> bool:
        return self.api is not None and self.api.proc is not None and self.api.proc.poll() is None

    def stop_api(self) -> None:
        """SIGTERM (the supervisor replacing it): requests in progress finish."""
        if self.api is not None:
            self.api.stop()

    def start_worker(self, fault: str | None = None) -> Process:
        """A worker (with KNOWPATCH_FAULT_INJECTION=fault), returned once it serves /ready. With a fault
        it may die before that; then it is returned as soon as it has."""
        assert self.worker is None or self.worker.proc is None or self.worker.proc.poll() is not None, \
            "a worker is still running"
        env = self.env | ({"KNOWPATCH_FAULT_INJECTION": fault} if fault else {})
        self.worker = Process(["worker"], env, self.worker_log)
        self.worker_starts += 1
        self.worker.start(f"{self.worker_url}/health", START_S)
        wait_for(lambda: not self.worker_alive() or httpx.get(f"{self.worker_url}/ready", timeout=5).status_code == 200,
                 "the worker is ready", START_S)
        return self.worker

    def worker_alive(self) -> bool:
        return self.worker is not None and self.worker.proc is not None and self.worker.proc.poll() is None

    def kill_worker(self) -> bool:
        """SIGKILL the worker if it runs; whether it did."""
        if not self.worker_alive():
            return False
        assert self.worker is not None and self.worker.proc is not None
        self.worker.proc.send_signal(signal.SIGKILL)
        self.worker.proc.wait(30)
        return True

    def stop_worker(self) -> None:
        """SIGTERM: the worker finishes its iteration and writes its snapshot."""
        if self.worker is not None:
            self.worker.stop()

    def snapshot_path(self) -> Path:
        """Where the worker keeps its factor-store snapshot (knowpatch.cli.snapshot_path: one per URL)."""
        key = hashlib.sha256(self.database.url.encode()).hexdigest()[:16]
        return self.cache_dir / "snapshots" / f"factor-store-{key}.pt"

    def drop_snapshot(self) -> None:
        """So that the next worker replays every factor from the ledger (the cold path)."""
        shutil.rmtree(self.cache_dir / "snapshots", ignore_errors=True)

    # ---- HTTP --------------------------------------------------------------------------------

    def client(self, who: str | None = "writer") -> httpx.Client:
        """An API client with the writer's, admin's or generator's key, or none (None)."""
        if who not in self._clients:
            headers = {"Authorization": f"Bearer {getattr(self.keys, who)}"} if who else {}
            self._clients[who] = httpx.Client(base_url=self.api_url, headers=headers, timeout=60)
        return self._clients[who]

    def worker_info(self) -> dict:
        """The worker's own /internal/info (model version, served weights digest)."""
        reply = httpx.get(f"{self.worker_url}/internal/info", timeout=60,
                          headers={"Authorization": f"Bearer {self.internal_token}"})
        reply.raise_for_status()
        return reply.json()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        for process in (self.worker, self.api):
            if process is not None:
                process.stop()
        self.redis.stop()
        self.engine.dispose()
        self.database.drop()
