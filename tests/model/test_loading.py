"""The converted-model cache shared by processes: two conversions of the embedded model into the same
folder at once both end with the one finished conversion, and a conversion folder left by a process
that died is removed, one of a live process kept."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.model.loading import remove_stale_temporaries

REPO = Path(__file__).resolve().parents[2]
# Both processes import everything, then wait at the gate for each other, so that both find no
# converted model and convert: one renames its folder into place, the other loses the rename.
CONVERT = """
import logging, sys, time
from pathlib import Path
from service.model.loading import load_model
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
gate, me, cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
(gate / me).touch()
while len(list(gate.iterdir())) < 2:
    time.sleep(0.01)
print("fingerprint", load_model("smollm2", cache_dir=cache).fingerprint, flush=True)
"""


@pytest.mark.slow
def test_two_processes_converting_into_one_cache_both_load_the_finished_conversion(tmp_path: Path) -> None:
    cache, gate = tmp_path / "cache", tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(gate), name, str(cache)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    fingerprints = {line.split()[1] for out in outputs for line in out.splitlines() if line.startswith("fingerprint")}
    assert len(fingerprints) == 1, outputs
    assert sum("converted" in out and "first; using its copy" in out for out in outputs) == 1, outputs
    [target] = (cache / "models").iterdir()  # the loser's folder is gone, nothing half-written is left
    assert ".tmp" not in target.name and (target / "config.json").is_file()


def test_conversion_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "models" / "smollm2-135m-instruct-0123"
    target.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = target.with_name(f"{target.name}.tmp{dead.pid}")
    live = target.with_name(f"{target.name}.tmp{os.getpid()}")  # a conversion still running
    other = target.with_name(f"{target.name}.tmpdata")  # not a pid: not ours to judge
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    remove_stale_temporaries(target)
    assert not stale.exists() and live.is_dir() and other.is_dir()
