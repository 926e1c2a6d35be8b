"""The null-space eigendecompositions are cached beside the key statistics, and the context templates
beside them: a warm start loads both."""
from __future__ import annotations

import torch

from service.engine import nullspace_cache, templates
from service.engine.corpus import TextCorpus
from service.engine.editor import Editor
from service.engine.types import HyperParams
from service.progress import Progress
from tests.conftest import small_text

from .conftest import tiny_model

HP = HyperParams(layers=(1, 2), stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)


def test_a_second_build_loads_the_null_spaces_bit_for_bit(smollm2, tmp_path, monkeypatch):
    tiny = tiny_model("llama", smollm2.tokenizer)
    calls: list[int] = []
    real = nullspace_cache.null_space

    def counting(moment: torch.Tensor, *args: object) -> object:
        calls.append(moment.shape[0])
        return real(moment, *args)

    monkeypatch.setattr(nullspace_cache, "null_space", counting)
    phases: list[str] = []
    tracker = Progress()
    monkeypatch.setattr(tracker, "phase", lambda name, *a, **k: (phases.append(name), Progress.phase(tracker, name, *a, **k)))

    def build() -> Editor:
        return Editor.create(tiny, HP, TextCorpus(small_text()), tmp_path, progress=False, tracker=tracker)

    first = build()
    assert len(calls) == 2 and len(list((tmp_path / "stats").glob("*-nullspace-t1e-09.pt"))) == 2
    assert phases[:2] == ["key statistics", "null space"]
    assert tracker.snapshot()["phase"] == "context templates"
    second = build()
    assert len(calls) == 2  # no eigendecomposition the second time
    for layer in HP.layers:
        assert torch.equal(first.null_spaces[layer].basis, second.null_spaces[layer].basis)
        assert torch.equal(first.null_spaces[layer].eigenvalues, second.null_spaces[layer].eigenvalues)
    other = Editor.create(tiny, HP.with_overrides(nullspace_threshold=1e-3), TextCorpus(small_text()), tmp_path,
                          progress=False)
    assert len(calls) == 4 and other.null_spaces[1].kept >= first.null_spaces[1].kept  # the threshold is in the key
    for editor in (first, second, other):
        editor.close()


def test_the_context_templates_are_sampled_once_and_read_back(smollm2, tmp_path, monkeypatch):
    tiny = tiny_model("llama", smollm2.tokenizer)
    calls: list[int] = []
    real = templates.context_templates

    def counting(model, tokenizer, seed, length):
        calls.append(seed)
        return real(model, tokenizer, seed, length)

    monkeypatch.setattr(templates, "context_templates", counting)
    built: list[Editor] = []

    def build(hp: HyperParams = HP) -> Editor:
        built.append(Editor.create(tiny, hp, TextCorpus(small_text()), tmp_path, progress=False))
        return built[-1]

    first = build()
    assert calls == [HP.context_seed]
    (path,) = (tmp_path / "templates").glob("*.pt")
    second = build()
    assert calls == [HP.context_seed] and second.templates == first.templates
    assert first.templates == real(tiny.model, tiny.tokenizer, HP.context_seed, HP.context_template_len)
    path.write_bytes(b"{not a torch file")  # a damaged cache is sampled again and rewritten
    assert build().templates == first.templates and len(calls) == 2
    assert torch.load(path, weights_only=True) == first.templates
    build(HP.with_overrides(context_seed=HP.context_seed + 1))  # the seed is in the key
    assert len(calls) == 3 and len(list((tmp_path / "templates").glob("*.pt"))) == 2
    for editor in built:
        editor.close()
