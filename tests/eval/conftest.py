"""Fixtures of the evaluation tests: the evaluation's real in-process target (evaluation.targets.engine.
EngineTarget) over a real Editor on a tiny random Llama with the SmolLM2 tokenizer.

`editor` is the API tests' fixture (AlphaEdit, layers 1-3, statistics over 64 tokens of the tests' small
text, one context template, torch on one thread while the package runs), built once for this package.
`target` wraps it for one test and reverts that test's edits afterwards through the editor's own
revert path, so every test starts from the unedited model at version 0. `make_target` builds
further real editors (another method, other hyper-parameters) on fresh copies of the same model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from service.engine.editor import Editor
from service.engine.types import Method
from evaluation.targets.engine import EngineTarget
from tests.api.conftest import editor  # noqa: F401  (the shared fixture, re-registered for this package)
from tests.engine.conftest import tiny_model, wikitext_moments


@pytest.fixture
def target(editor: Editor) -> Iterator[EngineTarget]:  # noqa: F811
    """EngineTarget over the shared editor; the test's edits are reverted after it."""
    digest, version = editor.weights_digest(), editor.version
    yield EngineTarget(editor)
    for edit_id in reversed(editor.store.edit_ids):
        editor.install(editor.plan_revert(edit_id), version)
    assert editor.weights_digest() == digest, "reverting the test's edits did not restore the weights"



MakeTarget = Callable[..., EngineTarget]


@pytest.fixture
def make_target(editor: Editor) -> Iterator[MakeTarget]:  # noqa: F811
    """make_target(method="alphaedit", **hparams) -> EngineTarget on a new Editor over a fresh copy of the
    shared tiny Llama (same seed, same weights), with the shared hyper-parameters plus `hparams`. The
    statistics are the shared ones unless a statistics setting changes. Closed after the test."""
    built: list[Editor] = []

    def make(method: Method = "alphaedit", **overrides) -> EngineTarget:
        hparams = editor.hparams.with_overrides(**overrides)
        loaded = tiny_model("llama", editor.tokenizer)
        assert loaded.fingerprint == editor.loaded.fingerprint  # the same weights as the shared, unedited model
        same_stats = (hparams.stats_tokens, hparams.stats_seq_len) == (editor.hparams.stats_tokens,
                                                                       editor.hparams.stats_seq_len)
        moments = editor.second_moments if same_stats else wikitext_moments(loaded, hparams)
        built.append(Editor(loaded, hparams, moments, method=method, templates=["{}"]))
        return EngineTarget(built[-1])

    yield make
    for made in built:
        made.close()
