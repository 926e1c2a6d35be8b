"""Settings, read once at start-up from the environment (prefix KNOWPATCH_) or a .env file."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KNOWPATCH_", env_file=".env", extra="ignore")

    # Model
    model: str = Field(DEFAULT_MODEL, description="'smollm2' (embedded default), a local path or a Hugging Face id")
    gguf_file: str | None = Field(None, description="GGUF file name inside `model`, for GGUF checkpoints")
    device: str = Field("cpu", description="torch device of the model, e.g. cpu, cuda, cuda:1")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device_map: str | None = Field(None, description="accelerate device_map (e.g. auto) for models larger than one device")
    cache_dir: Path = Field(Path.home() / ".cache" / "knowpatch", description="converted models and key statistics")
    hub_offline: bool = Field(True, description="never download from a hub at run time")

    # Editing
    method: Literal["alphaedit", "memit"] = "alphaedit"
    profile: Literal["default", "paper"] = Field(
        "default", description="hyper-parameter profile: the project's lifelong-editing set, or the paper's settings")
    layers: list[int] | None = Field(None, description="edited layers; default from the model's hyper-parameter file")
    corpus: str = Field("self", description="preserved-knowledge corpus: 'self' (model-generated text) or a text file/folder")
    stats_tokens: int | None = Field(None, description="token budget of the key statistics; default from hparams")
    nullspace_threshold: float | None = None
    nullspace_energy: float | None = Field(None, description="optional relative criterion: keep directions holding this share of energy out")
    stop_margin: float | None = Field(
        None, ge=0, description="most-probable early stop: log-probability margin of each target token (default from hparams)")
    norm_penalty: float | None = Field(None, ge=0, description="weight of the accumulated-update norm in the solve")
    seed: int | None = Field(
        None, description="seed of the context templates and the self-generated corpus (default: the hparams' context_seed)")
    hparam_overrides: dict[str, int | float | None] = Field(
        default_factory=dict, description="any further hyper-parameter by name, as JSON in the environment, e.g. "
                                          "'{\"v_lr\": 0.3}'; null unsets an optional one; applied after the fields above")

    # Quality gates (per edit, POST /edits `gates` overrides the thresholds and adds probes)
    gate_min_efficacy: float | None = Field(
        None, ge=0, le=1, description="reject an edit whose P(target_new | prompt) after it is below this (unset: off)")
    gate_min_generalisation: float | None = Field(
        None, ge=0, le=1, description="reject below this mean P(target_new) over the rephrase prompts (unset: off)")
    gate_max_locality_drop: float | None = Field(
        None, ge=0, le=1, description="reject when P(target_new) on a locality prompt rises by more than this (unset: off)")
    gate_probes: str = Field(
        "default", description="facts no edit may break: 'default' (shipped set), 'none', or a JSON file "
                               "{\"probes\": [{\"prompt\", \"expected\"}]}")

    # Service
    data_dir: Path = Field(Path(".knowpatch"), description="local data of the embedded deployment (SQLite ledger)")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/ledger.db")
    redis_url: str | None = Field(None, description="Redis URL for the queue; unset = in-process queue (embedded)")
    queue_stream: str = "knowpatch:edits"
    queue_group: str = "knowpatch-workers"
    worker_url: str | None = Field(None, description="where the API forwards generation in the split deployment")
    worker_host: str = Field("127.0.0.1", description="the worker's internal server; non-loopback needs internal_token")
    worker_port: int = 8001
    internal_token: SecretStr | None = Field(
        None, description="shared secret of the API and the worker's internal routes; unset: one generated in "
                          "cache_dir, which only processes sharing that folder (one machine) can read")
    batch_size: int = Field(8, ge=1, le=256, description="most consecutive queued edits coalesced into one solve")
    max_queued: int | None = Field(
        10_000, ge=1, description="most unfinished ledger operations; POST /edits beyond it gets 429 (None: no bound)")
    max_queued_per_key: int | None = Field(
        1_000, ge=1, description="most unfinished edits of one API key (requester); beyond it 429")
    api_keys: str | None = Field(None, description="API keys: 'name:key:scope1,scope2;...' or a path to a JSON file")
    version_wait_s: float = Field(30.0, description="longest wait for min_model_version")
    max_new_tokens_limit: int = 512
    fault_injection: str | None = Field(None, description="testing only: after_compute | after_commit | during_rollback kills the worker there; after_ledger_write kills the API (split) between an operation's ledger commit and its enqueue")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ledger.db').resolve()}"


INTERNAL_TOKEN_FILE = "internal-token"


def internal_token(settings: Settings) -> str:
    """The secret the API presents to the worker: KNOWPATCH_INTERNAL_TOKEN, else one generated once in
    the cache folder (mode 0600), so an API and a worker started on one machine agree without setup."""
    if settings.internal_token is not None:
        value = settings.internal_token.get_secret_value()
        if len(value) < 16:
            raise ValueError("KNOWPATCH_INTERNAL_TOKEN must be at least 16 characters")
        return value
    path = settings.cache_dir / INTERNAL_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{INTERNAL_TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
        try:
            os.link(tmp, path)  # atomic, and refused if another process got there first: its token wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
