"""Settings, read once at start-up from the environment (prefix KNOWPATCH_) or a .env file."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
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

    # Service
    data_dir: Path = Field(Path(".knowpatch"), description="local data of the embedded deployment (SQLite ledger)")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/ledger.db")
    redis_url: str | None = Field(None, description="Redis URL for the queue; unset = in-process queue (embedded)")
    queue_stream: str = "knowpatch:edits"
    queue_group: str = "knowpatch-workers"
    worker_url: str | None = Field(None, description="where the API forwards generation in the split deployment")
    worker_host: str = "127.0.0.1"
    worker_port: int = 8001
    batch_size: int = Field(8, ge=1, le=256, description="most consecutive queued edits coalesced into one solve")
    api_keys: str | None = Field(None, description="API keys: 'name:key:scope1,scope2;...' or a path to a JSON file")
    version_wait_s: float = Field(30.0, description="longest wait for min_model_version")
    max_new_tokens_limit: int = 512
    fault_injection: str | None = Field(None, description="testing only: after_compute | after_commit | during_rollback kills the worker there")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ledger.db').resolve()}"
