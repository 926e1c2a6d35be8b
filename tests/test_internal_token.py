"""The internal token: configured, or generated once per cache folder and shared by the processes
that use it; a worker off loopback refuses to start without a configured one."""
from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from knowpatch.cli import _check_worker_exposure
from service.config import Settings, internal_token


def test_generated_once_per_cache_folder(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    with ThreadPoolExecutor(8) as pool:
        tokens = set(pool.map(lambda _: internal_token(settings), range(16)))
    assert len(tokens) == 1 and len(tokens.pop()) >= 32
    path = tmp_path / "internal-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["internal-token"]  # no temporaries left
    assert internal_token(Settings(cache_dir=tmp_path / "other")) != path.read_text()


def test_configured_token_wins_and_must_be_long(tmp_path: Path) -> None:
    assert internal_token(Settings(cache_dir=tmp_path, internal_token="s" * 16)) == "s" * 16
    assert not (tmp_path / "internal-token").exists()
    with pytest.raises(ValueError, match="at least 16 characters"):
        internal_token(Settings(cache_dir=tmp_path, internal_token="short"))


def test_worker_off_loopback_needs_a_configured_token() -> None:
    with pytest.raises(SystemExit, match="without KNOWPATCH_INTERNAL_TOKEN"):
        _check_worker_exposure(Settings(worker_host="0.0.0.0"))
    _check_worker_exposure(Settings(worker_host="0.0.0.0", internal_token="s" * 16))
    _check_worker_exposure(Settings(worker_host="127.0.0.1"))
