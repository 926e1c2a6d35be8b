"""Shared fixtures. Postgres and Redis are required services (see docker-compose.yml): tests that
need them fail, with the reason, when they are unreachable; nothing is skipped.

Override the servers with KNOWPATCH_TEST_POSTGRES (an admin URL, psycopg form) and
KNOWPATCH_TEST_REDIS.

The benchmark files (CounterFact, zsRE, knowns, WikiText-2) are read from ../shared/data, or from
KNOWPATCH_SHARED_DATA; tests that need them skip, naming the path, where they are missing. Tiny-model
statistics use `small_text()`, a text the tests write themselves, so they run on a bare clone.

Converted models, key statistics and anything else the tests cache go to KNOWPATCH_TEST_CACHE
(default .cache/tests in the repository, kept between runs), never to the user's ~/.cache/knowpatch.
"""
from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("KNOWPATCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("KNOWPATCH_TEST_REDIS", "redis://127.0.0.1:6379/0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KNOWPATCH_SHARED_DATA") or REPO.parent / "shared" / "data")
SHARED_FILES = {
    "counterfact": "counterfact/counterfact-train.json",
    "zsre": "zsre/zsre_mend_train-1k.json",
    "knowns": "knowns/known_1000.json",
    "wikitext": "corpus/wikitext2_raw_test.txt",
}
TEST_CACHE = Path(os.environ.get("KNOWPATCH_TEST_CACHE") or REPO / ".cache" / "tests")


def shared_data(name: str) -> Path:
    """The path of a shared benchmark file (a SHARED_FILES key, or a path relative to the shared data
    folder); skips the calling test, naming the path, where it is missing. Call it inside a test or
    fixture, never at import."""
    path = SHARED_DATA / SHARED_FILES.get(name, name)
    if not path.is_file():
        pytest.skip(f"needs {path} (the shared data folder ../shared/data next to the repository; "
                    f"set KNOWPATCH_SHARED_DATA to a folder that holds {SHARED_FILES.get(name, name)})")
    return path


_SUBJECTS = ("The river", "A small town", "The old bridge", "Her first novel", "The orchestra", "The harbour",
             "A local farmer", "The museum", "The railway company", "His younger brother", "The council",
             "The football club", "A travelling painter", "The village school", "The new hospital", "The ferry",
             "Margaret Okafor", "The chemist Ivan Petrov", "Our neighbour", "The bakery", "A Swiss engineer",
             "The cathedral choir", "Every spring, the monks", "The shipyard", "The weekly newspaper")
_VERBS = ("was founded in", "moved to", "is known for", "was rebuilt after", "opened near", "was named after",
          "sold its land to", "wrote about", "was painted by", "played in", "closed during", "grew around",
          "borrowed money from", "argued with", "measured the depth of", "quietly returned to", "photographed")
_OBJECTS = ("the northern valley", "the winter of {year}", "a wealthy merchant", "the great fire", "the coast",
            "the capital", "an old monastery", "the second war", "the market square", "the royal family",
            "a famous poet", "the copper mines", "the university", "the summer festival", "the main road",
            "{count} sheep", "Lake Geneva", "the Danube delta", "a violin made in {year}", "the tax office",
            "its {count} members", "the oak forest", "a broken telescope", "the harvest of {year}")
_TAILS = ("", " and stayed there for many years", ", according to the parish records", " before the flood",
          ", which surprised many people", " with the help of its neighbours", " in a short ceremony",
          " (see chapter {count})", "; nobody knows why", " for about {count} pounds", " until {year}")


def small_text() -> Path:
    """A plain English text of about 5,000 SmolLM2 tokens, written by the tests into the test cache
    (always the same words): the preserved-knowledge corpus of the tiny-model statistics."""
    rng = random.Random(0)

    def sentence() -> str:
        words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
        return words.format(year=rng.randint(1500, 2020), count=rng.randint(2, 900))

    paragraphs = [" ".join(sentence() for _ in range(12)) for _ in range(30)]
    text = "\n\n".join(paragraphs) + "\n"
    path = TEST_CACHE / "small-text.txt"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh, empty Postgres database, dropped after the test."""
    with fresh_postgres() as url:
        yield url


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """pg_url's database for a wider scope: a fresh, empty one, dropped when the block ends."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import URL

    name = f"kp_test_{uuid.uuid4().hex[:16]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres is required for this test but {PG_ADMIN_URL} is unreachable "
                    f"(start it, or set KNOWPATCH_TEST_POSTGRES): {exc}", pytrace=False)
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            info = admin.info
            url = URL.create("postgresql+psycopg", username=info.user, password=info.password or None,
                             host=info.host, port=info.port, database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            # FORCE: a test that leaked a connection must not leave its database behind
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def postgres_down(url: str) -> Iterator[None]:
    """A real outage of the Postgres database at `url` (as pg_url makes) while the block runs: new
    connections are refused and the open ones are cut, as in a database restart. Back afterwards."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = sql.Identifier(str(make_url(url).database))
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          [make_url(url).database])
            yield
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLAlchemy URL of a SQLite file that does not exist yet (in a folder that does not either)."""
    return f"sqlite:///{tmp_path / 'ledger' / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """Runs the test on both ledger backends."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def redis_url() -> str:
    """The URL of the test Redis, checked to answer. Tests must use unique key names and delete them."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required for this test but {REDIS_TEST_URL} is unreachable "
                    f"(start it, or set KNOWPATCH_TEST_REDIS): {exc}", pytrace=False)
    finally:
        client.close()
    return REDIS_TEST_URL


def submit_edits(sessions, subjects: list[str]) -> list[str]:
    """Queue one edit per subject straight into a ledger (as POST /edits records them); their ids."""
    from service.ledger import repository as repo

    requests = [{"subject": s, "prompt": f"{s} is located in the city of", "target_new": "Rome",
                 "target_true": "Paris", "rephrase_prompts": [], "locality_prompts": []} for s in subjects]
    with sessions() as session:
        edits, _ = repo.create_edits(session, requests, subjects=subjects, requested_by="test", method="alphaedit",
                                  idempotency_key=None)
        session.commit()
        return [e.id for e in edits]
