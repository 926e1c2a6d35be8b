"""Building the engine from settings: shared by the worker, the embedded server and the evaluation."""
from __future__ import annotations

import logging

from service.config import Settings
from service.engine.corpus import Corpus, SelfGeneratedCorpus, TextCorpus
from service.engine.editor import Editor
from service.engine.types import HyperParams, load_hparams
from service.model.loading import LoadedModel, load_model

log = logging.getLogger(__name__)


def hparams_from(settings: Settings) -> HyperParams:
    """The model's shipped hyper-parameters with the settings' overrides."""
    return load_hparams(settings.model, settings.profile).with_overrides(
        layers=settings.layers, stats_tokens=settings.stats_tokens,
        nullspace_threshold=settings.nullspace_threshold, nullspace_energy=settings.nullspace_energy,
        v_stop_greedy_margin=settings.stop_margin, norm_penalty=settings.norm_penalty,
    )


def corpus_from(name: str, loaded: LoadedModel) -> Corpus:
    """'self': text the model samples itself (needs no file); otherwise a text file or folder."""
    if name == "self":
        return SelfGeneratedCorpus(loaded.model, loaded.fingerprint)
    return TextCorpus(name)


def load_from(settings: Settings) -> LoadedModel:
    return load_model(
        settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir,
        gguf_file=settings.gguf_file, device_map=settings.device_map, local_files_only=settings.hub_offline,
    )


def build_editor(settings: Settings, progress: bool = True, keep_factors: bool = True) -> Editor:
    """`keep_factors=False` for a worker: the ledger holds every edit's factors, the editor only sums."""
    loaded = load_from(settings)
    hparams = hparams_from(settings)
    log.info("model %s loaded (%s); preparing key statistics over corpus %r", settings.model, loaded.fingerprint, settings.corpus)
    return Editor.create(loaded, hparams, corpus_from(settings.corpus, loaded), settings.cache_dir,
                         method=settings.method, progress=progress, keep_factors=keep_factors)
