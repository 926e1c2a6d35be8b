"""`knowpatch export`: a ledger written by the real worker (SQLite, tiny random Llama) exported as a merged
Hugging Face folder (the service's logits bit for bit) and as a PEFT LoRA adapter (within 1e-4)."""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from service.engine.editor import Editor
from service.engine.types import HyperParams
from service.errors import Conflict, InvalidRequest
from service.export import INFO_FILE, export_merged, export_peft, ledger_state, replay
from service.ledger import repository as repo
from service.ledger.db import make_engine, migrate, session_factory
from service.model.loading import load_model
from service.queue.local import LocalQueue
from tests.conftest import small_text, submit_edits
from tests.engine.conftest import CACHE_DIR, tiny_model, wikitext_moments
from workers.worker import Worker

requires_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                   reason="needs the export extra: pip install -e '.[export]'")

HP = HyperParams(layers=(1, 2, 3), v_num_grad_steps=5, stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)
SUBJECTS = ["Eiffel Tower", "Big Ben", "Colosseum"]
PROMPTS = ["Eiffel Tower is located in the city of", "Big Ben is located in the city of",
           "The capital of France is", "Colosseum is located in the city of"]
PEFT_TOLERANCE = 1e-4  # max |logit difference|, float32


@dataclass
class Ledger:
    tokenizer: object
    moments: dict
    url: str
    sessions: object
    ids: list[str]
    served: dict[int, tuple[str, list[torch.Tensor]]]  # version -> (weights digest, logits of PROMPTS)

    def editor(self) -> Editor:
        return Editor(tiny_model("llama", self.tokenizer), HP, self.moments, templates=["{}"], keep_factors=False)


def _logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(tokenizer(p, return_tensors="pt").input_ids).logits[0] for p in PROMPTS]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _load_adapter(base, folder):
    """PeftModel.from_pretrained, failing on PEFT's warning of adapter keys it found no weights for."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = PeftModel.from_pretrained(base, folder).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    return adapted


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> Ledger:
    """Versions 2 (a batch of two edits), 3 (a third edit) and 4 (the first rolled back): the head
    holds two active edits. The live worker's digest and logits are kept per version."""
    torch.set_num_threads(1)
    tokenizer = load_model("smollm2", cache_dir=CACHE_DIR).tokenizer
    moments = wikitext_moments(tiny_model("llama", tokenizer), HP)
    url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    migrate(url)
    sessions = session_factory(make_engine(url))
    state = Ledger(tokenizer, moments, url, sessions, [], {})
    live = Worker(state.editor(), sessions, LocalQueue(), batch_size=2)

    def drain() -> None:
        while live.process_next():
            pass
        state.served[live.editor.version] = (live.editor.weights_digest(), _logits(live.editor.model, tokenizer))

    state.ids = submit_edits(sessions, SUBJECTS[:2])
    drain()
    state.ids += submit_edits(sessions, SUBJECTS[2:])
    drain()
    with sessions() as session:
        repo.request_rollback(session, state.ids[0], reason="wrong", actor="test")
        session.commit()
    drain()
    with sessions() as session:
        assert [repo.get_edit(session, i).status for i in state.ids] == ["rolled_back", "applied", "applied"]
    assert sorted(state.served) == [2, 3, 4]
    return state


def _replayed(ledger: Ledger, version: int | None = None):
    editor = ledger.editor()
    with ledger.sessions() as session:
        state = ledger_state(session, editor.layers, version)
    replay(editor, state)
    return editor, state


def test_merged_export_loads_with_the_service_weights_and_logits_bit_for_bit(ledger, tmp_path):
    editor, state = _replayed(ledger)
    assert (state.seq, len(state.edits)) == (4, 2)
    info = export_merged(editor, state, tmp_path / "merged")

    digest, served_logits = ledger.served[4]
    assert info["weights_digest"] == digest and info["ledger_head_seq"] == 4 and info["active_edits"] == 2
    assert info["edited_layers"] == [1, 2, 3]
    assert info["edited_modules"] == [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    assert json.loads((tmp_path / "merged" / INFO_FILE).read_text()) == info
    assert (tmp_path / "merged" / "model.safetensors").is_file()

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    for layer in (1, 2, 3):
        assert torch.equal(exported.model.layers[layer].mlp.down_proj.weight,
                           editor.adapter.edited_module(layer).weight)
    for exported_logits, served in zip(_logits(exported, ledger.tokenizer), served_logits):
        assert torch.equal(exported_logits, served)


@requires_peft
def test_peft_adapter_gives_the_service_logits_within_tolerance_and_merges_to_the_merged_export(ledger, tmp_path):

    editor, state = _replayed(ledger)
    export_merged(editor, state, tmp_path / "merged")
    info = export_peft(editor, state, tmp_path / "adapter")
    lora = info["lora"]
    assert lora["exact"] and lora["rank"] == {"1": 2, "2": 2, "3": 2} and lora["scaling"] == 1.0
    assert max(lora["relative_frobenius_error"].values()) < 1e-12  # B A is the exact sum in float64
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"], config["layers_to_transform"]) == \
        (2, 2, ["down_proj"], [1, 2, 3])

    # lora_B = R (d_out x N), lora_A = Aᵀ (N x d_in): the edits' own factors, in ledger order
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.2.mlp.down_proj"
    assert weights[f"{key}.lora_B.weight"].shape == (64, 2) and weights[f"{key}.lora_A.weight"].shape == (2, 128)
    assert torch.equal(weights[f"{key}.lora_B.weight"][:, 0], state.edits[0].layers[2].r)
    assert torch.equal(weights[f"{key}.lora_A.weight"][1], state.edits[1].layers[2].a)

    adapted = _load_adapter(tiny_model("llama", ledger.tokenizer).model, tmp_path / "adapter")
    assert sorted(name for name, _ in adapted.named_modules() if name.endswith("lora_A")) == \
        [f"base_model.model.model.layers.{i}.mlp.down_proj.lora_A" for i in (1, 2, 3)]
    _, served = ledger.served[4]
    adapter_diff = _max_diff(_logits(adapted, ledger.tokenizer), served)
    assert adapter_diff <= PEFT_TOLERANCE, adapter_diff

    merged = adapted.merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    weight_diff = max(float((merged.model.layers[i].mlp.down_proj.weight.detach()
                             - exported.model.layers[i].mlp.down_proj.weight).abs().max()) for i in (1, 2, 3))
    assert weight_diff <= 1e-6, weight_diff
    merged_diff = _max_diff(_logits(merged, ledger.tokenizer), served)
    assert merged_diff <= PEFT_TOLERANCE, merged_diff
    print(f"peft exact adapter: max |logit diff| {adapter_diff:.2e} (adapter), {merged_diff:.2e} (merged); "
          f"max |weight diff| after merge_and_unload {weight_diff:.2e}")


@requires_peft
def test_rank_truncates_each_layer_by_svd_and_reports_the_error(ledger, tmp_path):

    editor, state = _replayed(ledger)
    info = export_peft(editor, state, tmp_path / "rank1", rank=1)
    lora = info["lora"]
    assert not lora["exact"] and lora["rank"] == {"1": 1, "2": 1, "3": 1} and lora["requested_rank"] == 1
    errors = lora["relative_frobenius_error"].values()
    assert all(0.0 < e < 1.0 for e in errors), errors
    for layer in editor.layers:  # the best rank-1 error is σ2 / sqrt(σ1² + σ2²)
        s = torch.linalg.svdvals(editor.store.accumulated(layer))
        expected = float(s[1:].norm() / s.norm())
        assert abs(lora["relative_frobenius_error"][str(layer)] - expected) < 1e-6
    adapted = _load_adapter(tiny_model("llama", ledger.tokenizer).model, tmp_path / "rank1")
    assert adapted.peft_config["default"].r == 1
    print(f"rank-1 adapter of 2 edits: relative errors {sorted(errors)}, max |logit diff| "
          f"{_max_diff(_logits(adapted, ledger.tokenizer), ledger.served[4][1]):.3g}")

    info = export_peft(editor, state, tmp_path / "rank8", rank=8)  # at least the edits: their own factors
    assert info["lora"]["exact"] and info["lora"]["rank"]["1"] == 2


def test_an_earlier_version_exports_as_it_was_served(ledger, tmp_path):
    editor, state = _replayed(ledger, version=2)
    assert (state.seq, len(state.edits)) == (2, 2)  # before the third edit and the rollback
    info = export_merged(editor, state, tmp_path / "v2")
    digest, served = ledger.served[2]
    assert info["weights_digest"] == digest and info["ledger_head_seq"] == 2
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "v2", dtype=torch.float32).eval()
    assert all(torch.equal(x, y) for x, y in zip(_logits(exported, ledger.tokenizer), served))

    with ledger.sessions() as session:
        with pytest.raises(Conflict, match="never served"):  # inside the first batch
            ledger_state(session, editor.layers, version=1)
        with pytest.raises(InvalidRequest, match="from 0 to 4"):
            ledger_state(session, editor.layers, version=5)


def test_an_empty_ledger_exports_the_base_model_and_no_adapter(ledger, tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        editor = ledger.editor()
        with session_factory(engine)() as session:
            state = ledger_state(session, editor.layers)
        replay(editor, state)
        info = export_merged(editor, state, tmp_path / "base")
        assert info["active_edits"] == 0 and info["ledger_head_seq"] == 0
        with pytest.raises(InvalidRequest, match="no active edits"):
            export_peft(editor, state, tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()
        with pytest.raises(InvalidRequest, match="not an empty folder"):  # never over an earlier export
            export_merged(editor, state, tmp_path / "base")
    finally:
        engine.dispose()


@requires_peft
def test_the_cli_exports_the_ledger_written_by_the_worker(ledger, tmp_path, monkeypatch):
    from knowpatch.cli import main

    base = tmp_path / "tiny-llama"
    tiny_model("llama", ledger.tokenizer).model.save_pretrained(base)
    ledger.tokenizer.save_pretrained(base)
    for key in [k for k in os.environ if k.startswith("KNOWPATCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .env file
    for key, value in {"MODEL": str(base), "LAYERS": "[1,2,3]", "CORPUS": str(small_text()),
                       "STATS_TOKENS": "64", "NULLSPACE_THRESHOLD": "1e-9", "CACHE_DIR": str(tmp_path / "cache"),
                       "DATABASE_URL": ledger.url}.items():
        monkeypatch.setenv(f"KNOWPATCH_{key}", value)

    assert main(["export", "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert all(torch.equal(x, y) for x, y in zip(_logits(exported, ledger.tokenizer), ledger.served[4][1]))
    assert json.loads((tmp_path / "merged" / INFO_FILE).read_text())["weights_digest"] == ledger.served[4][0]

    assert main(["export", "--format", "peft", "--rank", "1", "--version", "3", "--out", str(tmp_path / "peft")]) == 0
    info = json.loads((tmp_path / "peft" / INFO_FILE).read_text())
    assert (info["ledger_head_seq"], info["active_edits"], info["lora"]["rank"]["1"]) == (3, 3, 1)
    assert info["weights_digest"] == ledger.served[3][0]

    with pytest.raises(SystemExit, match="--format peft only"):
        main(["export", "--rank", "2", "--out", str(tmp_path / "x")])


@pytest.mark.slow
@requires_peft
def test_smollm2_exports_through_the_cli_with_the_service_logits(tmp_path, monkeypatch):
    """The real SmolLM2 (tied embeddings, converted from GGUF) as the service builds it from its settings:
    one edit through the worker, then `knowpatch export` merged (bit for bit) and peft (within 1e-4)."""
    from peft import PeftModel

    from knowpatch.cli import main
    from service.bootstrap import build_editor
    from service.config import Settings

    torch.set_num_threads(2)
    for key in [k for k in os.environ if k.startswith("KNOWPATCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"KNOWPATCH_CACHE_DIR": str(CACHE_DIR), "KNOWPATCH_DATABASE_URL": url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    migrate(url)
    engine = make_engine(url)
    try:
        sessions = session_factory(engine)
        live = Worker(build_editor(Settings(), progress=False, keep_factors=False), sessions, LocalQueue())
        requests = [{"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is located in the city of",
                     "target_new": "Rome", "target_true": "Paris", "rephrase_prompts": [], "locality_prompts": []}]
        with sessions() as session:
            repo.create_edits(session, requests, subjects=["Eiffel Tower"], requested_by="test", method="alphaedit",
                              idempotency_key=None)
            session.commit()
        while live.process_next():
            pass
        tokenizer = live.editor.tokenizer
        served = _logits(live.editor.model, tokenizer)
        digest = live.editor.weights_digest()
        live.editor.close()
        del live
    finally:
        engine.dispose()

    assert main(["export", "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    info = json.loads((tmp_path / "merged" / INFO_FILE).read_text())
    assert (info["weights_digest"], info["active_edits"], info["edited_layers"]) == (digest, 1, [4, 5, 6, 7, 8])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()  # still tied
    assert all(torch.equal(x, y) for x, y in zip(_logits(exported, tokenizer), served))
    del exported

    assert main(["export", "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    diff = _max_diff(_logits(adapted, tokenizer), served)
    print(f"SmolLM2, 1 edit: peft adapter max |logit diff| {diff:.2e}")
    assert diff <= PEFT_TOLERANCE, diff


@requires_peft
def test_a_gpt2_adapter_sets_fan_in_fan_out_for_its_transposed_weights(ledger, tmp_path):
    """GPT-2 stores mlp.c_proj as Conv1D (d_in, d_out): the same A and B, with fan_in_fan_out."""

    from service.engine.factors import EditFactors, LayerFactor, on_grid
    from service.export import LedgerState

    torch.manual_seed(1)
    editor = Editor(tiny_model("gpt2", ledger.tokenizer), HP, wikitext_moments(tiny_model("gpt2", ledger.tokenizer), HP),
                    templates=["{}"], keep_factors=False)
    edits = [EditFactors(f"e{j}", "b", {layer: LayerFactor(*on_grid(torch.randn(64) * 0.1, torch.randn(128) * 0.1),
                                                           k=torch.randn(128)) for layer in editor.layers})
             for j in range(3)]
    editor.load(edits, version=3)
    served = _logits(editor.model, ledger.tokenizer)
    state = LedgerState(3, "0" * 64, editor.weights_digest(), edits)
    info = export_peft(editor, state, tmp_path / "adapter")
    assert info["edited_modules"] == [f"transformer.h.{i}.mlp.c_proj" for i in (1, 2, 3)]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # "c_proj" alone would also catch attn.c_proj
    assert config["fan_in_fan_out"] and config["target_modules"] == ["mlp.c_proj"] and config["layers_pattern"] == "h"
    adapted = _load_adapter(tiny_model("gpt2", ledger.tokenizer).model, tmp_path / "adapter")
    assert sorted(name for name, _ in adapted.named_modules() if name.endswith("lora_A")) == \
        [f"base_model.model.transformer.h.{i}.mlp.c_proj.lora_A" for i in (1, 2, 3)]
    assert _max_diff(_logits(adapted, ledger.tokenizer), served) <= PEFT_TOLERANCE
    assert _max_diff(_logits(adapted.merge_and_unload(), ledger.tokenizer), served) <= PEFT_TOLERANCE
    assert _max_diff(_logits(tiny_model("gpt2", ledger.tokenizer).model, ledger.tokenizer), served) > 1e-3
