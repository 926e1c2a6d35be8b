"""One cluster (API + worker + own Postgres database + own redis-server, tiny model) for the chaos
tests of this package, started once: the fault trials, the fuzzer and the auth matrix share it, and
the ledger it accumulates is checked whole after each trial."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.cluster import Cluster
from tests.chaos.trials import Replayer


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = Cluster(tmp_path_factory.mktemp("chaos"))
    try:
        started.start_api()
        started.start_worker()
        yield started
    finally:
        started.close()


@pytest.fixture(scope="package")
def replayer(cluster: Cluster) -> Iterator[Replayer]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model: one thread is fastest, and far faster on a busy machine
    yield Replayer(cluster)
    torch.set_num_threads(threads)
