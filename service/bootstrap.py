"""Building the engine from settings: shared by the worker, the embedded server and the evaluation."""
from __future__ import annotations

import logging

from service.config import Settings
from service.engine.corpus import Corpus, SelfGeneratedCorpus, TextCorpus
from service.engine.editor import Editor
from service.engine.types import HyperParams, load_hparams
from service.model.loading import LoadedModel, load_model
from service.progress import Progress

log = logging.getLogger(__name__)


def hparams_from(settings: Settings) -> HyperParams:
    """The model's shipped hyper-parameters in the settings' profile with the settings' overrides: the
    named fields first, then `hparam_overrides` (any field by name; None unsets an optional one)."""
    named = load_hparams(settings.model, settings.profile).with_overrides(
        layers=settings.layers, stats_tokens=settings.stats_tokens,
        nullspace_threshold=settings.nullspace_threshold, nullspace_energy=settings.nullspace_energy,
        v_stop_greedy_margin=settings.stop_margin, norm_penalty=settings.norm_penalty, context_seed=settings.seed,
    )
    if not settings.hparam_overrides:
        return named
    return HyperParams.from_dict({**named.to_dict(), **settings.hparam_overrides})  # refuses unknown names


def corpus_from(name: str, loaded: LoadedModel, seed: int = 0) -> Corpus:
    """'self': text the model samples itself from seeded openings (needs no file); otherwise a text file or folder."""
    if name == "self":
        return SelfGeneratedCorpus(loaded.model, loaded.fingerprint, seed=seed)
    return TextCorpus(name)


def load_from(settings: Settings) -> LoadedModel:
    return load_model(
        settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir,
        gguf_file=settings.gguf_file, device_map=settings.device_map, local_files_only=settings.hub_offline,
    )


def build_editor(settings: Settings, progress: bool = True, keep_factors: bool = True,
                 loaded: LoadedModel | None = None, tracker: Progress | None = None) -> Editor:
    """`keep_factors=False` for a worker: the ledger holds every edit's factors, the editor only sums.
    `loaded`: the model already loaded by `load_from(settings)` (the evaluation times the two apart).
    `tracker`: told of each phase (loading, statistics, null space) for /ready and the log."""
    tracker = tracker or Progress()
    if loaded is None:
        tracker.phase("loading the model (converting it on the first start)")
        loaded = load_from(settings)
    hparams = hparams_from(settings)
    log.info("model %s loaded (%s); preparing key statistics over corpus %r", settings.model, loaded.fingerprint, settings.corpus)
    corpus = corpus_from(settings.corpus, loaded, seed=hparams.context_seed)
    return Editor.create(loaded, hparams, corpus, settings.cache_dir, method=settings.method,
                         progress=progress, keep_factors=keep_factors, tracker=tracker)
