"""Plain data of the engine: requests, hyper-parameters. No torch here (the API imports it)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from typing import Any, Literal

from service.engine.validation import check_edit

Method = Literal["alphaedit", "memit"]


@dataclass(frozen=True)
class EditRequest:
    """One fact edit, the one request type from the API to the engine. Checked when built
    (InvalidRequest says what is wrong), so an EditRequest that exists can be applied."""

    subject: str
    prompt: str  # contains the subject verbatim or exactly one "{}"
    target_new: str
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("rephrase_prompts", "locality_prompts"):  # lists from JSON become tuples: hashable, frozen
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        check_edit(self.subject, self.prompt, self.target_new, self.target_true,
                   self.rephrase_prompts, self.locality_prompts)

    @property
    def template(self) -> str:
        """The prompt with "{}" where the subject goes."""
        if "{}" in self.prompt:
            return self.prompt
        return self.prompt.replace(self.subject, "{}", 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditRequest":
        return cls(
            subject=data["subject"],
            prompt=data["prompt"],
            target_new=data["target_new"],
            target_true=data.get("target_true"),
            rephrase_prompts=tuple(data.get("rephrase_prompts") or ()),
            locality_prompts=tuple(data.get("locality_prompts") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rephrase_prompts"] = list(self.rephrase_prompts)
        data["locality_prompts"] = list(self.locality_prompts)
        return data


@dataclass(frozen=True)
class HyperParams:
    profile: str = "default"  # which named set of the model's file these came from (see load_hparams)
    layers: tuple[int, ...] = ()  # empty: the adapter's default band for the model's depth
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_stop_loss: float = 5e-2  # the reference's early stop on the total loss
    v_stop_nll: float | None = None  # stop a request once its mean target NLL is below this
    # Most-probable early stopping (ENCORE): stop a request once every target token is the argmax on
    # every rewriting prompt, ahead of the runner-up by at least this log-probability margin.
    v_stop_greedy_margin: float | None = None
    nullspace_threshold: float = 2e-2  # absolute eigenvalue threshold of the paper
    nullspace_energy: float | None = None  # optional relative criterion (share of trace left out)
    L2: float = 10.0
    # Norm control: weight of ||W - W0||_F^2 (the accumulated update) in the solve, restricted to
    # updates of the batch's own rank-n form so every edit stays one revertible rank-one term.
    norm_penalty: float = 0.0
    mom2_update_weight: float = 15000.0  # MEMIT's lambda on C0
    stats_tokens: int = 100_000
    stats_seq_len: int = 256
    stats_batch_size: int = 8
    context_template_len: int = 10
    context_seed: int = 0
    max_update_ratio: float = 1.0  # refuse an update whose norm exceeds this share of ||W0||

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HyperParams":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"match", "comment", "evidence", "profiles"}
        if unknown:
            raise ValueError(f"unknown hyper-parameters: {sorted(unknown)}")
        values = {k: v for k, v in data.items() if k in known}
        if "layers" in values:
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> "HyperParams":
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "layers" in clean:
            clean["layers"] = tuple(clean["layers"])
        return replace(self, **clean)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data


PROFILES = ("default", "paper")


def load_hparams(model_name: str, profile: str = "default") -> HyperParams:
    """The shipped set whose `match` list names the model (else the default set), in a profile.

    "default" is the project's lifelong-editing set; "paper" applies the file's `profiles.paper`
    overrides, the settings that reproduce the AlphaEdit paper's algorithm on that model.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    data = _hparams_file(model_name)
    overrides = data.get("profiles", {}).get(profile, {}) if profile != "default" else {}
    unknown = set(overrides) - {f.name for f in fields(HyperParams)}
    if unknown:
        raise ValueError(f"profile {profile}: unknown hyper-parameters {sorted(unknown)}")
    values = {**{k: v for k, v in data.items() if k != "profiles"}, **overrides}  # a profile may set None
    return HyperParams.from_dict({**values, "profile": profile})


def _hparams_file(model_name: str) -> dict[str, Any]:
    folder = resources.files("service.engine") / "hparams"
    key = model_name.lower().rstrip("/").rsplit("/", 1)[-1]
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json") or entry.name == "default.json":
            continue
        data = json.loads(entry.read_text())
        if key in [m.lower() for m in data.get("match", [])]:
            return data
    return json.loads((folder / "default.json").read_text())


@dataclass
class RequestMetrics:
    """Probabilities of target_new / target_true (mean per-token, as probabilities)."""

    prompt: dict[str, float] = field(default_factory=dict)
    rephrase: list[dict[str, float]] = field(default_factory=list)
    locality: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
