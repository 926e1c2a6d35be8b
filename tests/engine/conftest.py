"""Fixtures of the engine tests: the real SmolLM2 (loaded once) and tiny random models."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
    Qwen2Config, Qwen3Config,
)

from service.engine.corpus import TextCorpus
from service.engine.stats import collect_second_moments
from service.engine.trace import LayerTrace
from service.model.adapters import ModelAdapter
from service.model.loading import LoadedModel, load_model, weights_fingerprint
from tests.conftest import SHARED_DATA, SHARED_FILES, TEST_CACHE, small_text

# Read through tests.conftest.shared_data where a missing file should skip the test.
DATA = SHARED_DATA
WIKITEXT = SHARED_DATA / SHARED_FILES["wikitext"]
CACHE_DIR = TEST_CACHE

_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4)
TINY_CONFIGS = {
    "llama": lambda v: LlamaConfig(vocab_size=v, num_key_value_heads=2, **_DECODER),
    "mistral": lambda v: MistralConfig(vocab_size=v, num_key_value_heads=2, **_DECODER),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, num_key_value_heads=2, **_DECODER),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, num_key_value_heads=2, head_dim=16, **_DECODER),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=64, n_layer=6, n_head=4, n_inner=128, n_positions=512),
    "gptj": lambda v: GPTJConfig(vocab_size=v, n_embd=64, n_layer=6, n_head=4, n_inner=128, rotary_dim=8, n_positions=512),
    "gpt_neox": lambda v: GPTNeoXConfig(vocab_size=v, **_DECODER, max_position_embeddings=512),
}


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2", cache_dir=CACHE_DIR)


def tiny_model(model_type: str, tokenizer) -> LoadedModel:
    torch.manual_seed(0)
    config = TINY_CONFIGS[model_type](len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if model_type == "gptj" else None)
    with torch.no_grad():  # random init is too flat for editing to be meaningful: sharpen the head
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, f"tiny-{model_type}", weights_fingerprint(model, f"tiny-{model_type}"))


def wikitext_moments(loaded: LoadedModel, hparams) -> dict:
    """Key statistics of a tiny model over the tests' own small text (tests.conftest.small_text; it was
    WikiText-2 once, hence the name), as the small-model tests use them."""
    adapter = ModelAdapter(loaded.model)
    trace = LayerTrace(adapter, hparams.layers)
    try:
        return collect_second_moments(adapter, trace, loaded.tokenizer, TextCorpus(small_text()), hparams.layers,
                                      hparams.stats_tokens, hparams.stats_seq_len, progress=False)
    finally:
        trace.close()
