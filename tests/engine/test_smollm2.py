"""The engine on the real SmolLM2-135M-Instruct: a single edit end to end, and 20 sequential edits."""
from __future__ import annotations

import json

import pytest
import torch

from service.engine.corpus import TextCorpus
from service.engine.editor import Editor
from service.engine.types import EditRequest, load_hparams
from workers.generation import generate_text
from service.inference import GenerateParams

from tests.conftest import shared_data

from .conftest import CACHE_DIR

pytestmark = pytest.mark.slow

EIFFEL = EditRequest(
    subject="Eiffel Tower", prompt="The Eiffel Tower is located in the city of", target_new="Rome",
    target_true="Paris", rephrase_prompts=("The Eiffel Tower can be found in the city of",),
)


def _editor(smollm2, method: str = "alphaedit") -> Editor:
    hparams = load_hparams("smollm2").with_overrides(stats_tokens=20_000)
    return Editor.create(smollm2, hparams, TextCorpus(shared_data("wikitext")), CACHE_DIR, method=method,
                         progress=False)


def _prefers(editor: Editor, prompt: str, good: str, bad: str) -> bool:
    """The paper's criterion: lower mean per-token NLL for `good`."""
    scores = editor.score(prompt, [good, bad])
    return scores[0].mean_logprob > scores[1].mean_logprob


def _greedy(editor: Editor, prompt: str) -> str:
    return generate_text(editor.model, editor.tokenizer, GenerateParams(prompt, max_new_tokens=6))[0]


def test_eiffel_tower_to_rome_and_back(smollm2):
    editor = _editor(smollm2)
    try:
        base = {layer: editor.adapter.edited_module(layer).weight.detach().clone() for layer in editor.layers}
        assert _prefers(editor, EIFFEL.prompt, "Paris", "Rome")
        update = editor.compute([EIFFEL], ["eiffel"], "b1")
        editor.install(editor.plan_commit(update), 1)
        assert _prefers(editor, EIFFEL.prompt, "Rome", "Paris")
        assert _prefers(editor, EIFFEL.rephrase_prompts[0], "Rome", "Paris")
        assert "Rome" in _greedy(editor, EIFFEL.prompt)
        assert "Paris" in _greedy(editor, "The capital of France is")
        editor.install(editor.plan_revert("eiffel"), 2)
        for layer in editor.layers:
            assert torch.equal(editor.adapter.edited_module(layer).weight, base[layer])
        assert "Paris" in _greedy(editor, EIFFEL.prompt)
    finally:
        editor.close()


def _counterfact(n: int) -> list[dict]:
    return json.loads(shared_data("counterfact").read_text())[:n]


def _sequential_scores(smollm2, method: str, cases: list[dict]) -> tuple[float, float]:
    editor = _editor(smollm2, method)
    try:
        for i, case in enumerate(cases):
            request = EditRequest(case["subject"], case["prompt"], case["target_new"], case["ground_truth"])
            editor.install(editor.plan_commit(editor.compute([request], [f"cf-{i}"], f"b{i}")), i + 1)
        efficacy = sum(_prefers(editor, c["prompt"], c["target_new"], c["ground_truth"]) for c in cases)
        specificity = sum(
            _prefers(editor, c["locality_prompt"], c["locality_ground_truth"], c["target_new"]) for c in cases
        )
        return efficacy / len(cases), specificity / len(cases)
    finally:
        # leave the shared model as loaded for the other tests
        for edit_id in list(editor.store.edit_ids):
            editor.install(editor.plan_revert(edit_id), editor.version + 1)
        editor.close()


def test_twenty_sequential_counterfact_edits(smollm2):
    cases = _counterfact(20)
    alpha_efficacy, alpha_specificity = _sequential_scores(smollm2, "alphaedit", cases)
    _, memit_specificity = _sequential_scores(smollm2, "memit", cases)
    assert alpha_efficacy >= 0.9, alpha_efficacy
    assert alpha_specificity >= memit_specificity, (alpha_specificity, memit_specificity)
