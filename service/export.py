"""Exporting the served model: the ledger's active edits at a model version, as a merged Hugging Face
folder or as a PEFT LoRA adapter on the edited modules.

Merged: the editor replays the ledger (the same exact int64 sums as the worker, the weights digest
checked against the ledger's), and the model is saved as it is served: `from_pretrained` on the folder
gives the service's weights bit for bit, hence the same logits.

PEFT: per edited layer, ΔW = Σ_j r_j a_jᵀ = R Aᵀ, written as lora_B = R (d_out × N) and lora_A = Aᵀ
(N × d_in) with lora_alpha = r = N, so PEFT's scaling alpha / r is 1. The factors are float32 numbers
and B A equals ΔW exactly in exact arithmetic; what differs from the merged model is float rounding in
the adapter's forward (x W0ᵀ + (x Aᵀ) Bᵀ instead of x (W0 + ΔW)ᵀ) or in `merge_and_unload` (B A summed
in the model's dtype). With `rank=K` each layer's ΔW is replaced by its best rank-K approximation
(truncated SVD of the exact float64 sum), and the relative Frobenius error is reported per layer.

Nothing here keeps state: the functions take an Editor, a ledger session or factors and return data.
`export_served` exports what a running service serves (GET /admin/export): its editor is already at a
version, so nothing is replayed; the ledger is read at that version and checked against the weights.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.engine.editor import Editor
from service.engine.factors import EditFactors
from service.errors import Conflict, InvalidRequest, LedgerCorrupt, ModelMoved
from service.inference import ExportFormat
from service.ledger import repository as repo
from service.ledger.tensors import to_engine
from service.ledger.models import ZERO_HASH, Edit, Operation

Sessions = Callable[[], Session]

log = logging.getLogger(__name__)

INFO_FILE = "export_info.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_READ_TRIES = 3


@dataclass(frozen=True)
class LedgerState:
    """The ledger at one model version: what the weights are made of there, and what they hash to."""

    seq: int  # the model version: seq of the last done operation at or before the version asked for
    chain_hash: str  # the hash chain's link at `seq`
    weights_digest: str | None  # recorded with that operation; None on an empty ledger
    edits: list[EditFactors]  # the active edits there, in ledger order


@dataclass(frozen=True)
class LoraLayer:
    """One edited layer's ΔW ≈ B A, float32, and how far B A is from the exact sum."""

    layer: int
    module: str  # the module's name in the model, e.g. model.layers.4.mlp.down_proj
    lora_a: torch.Tensor  # (rank, d_in)
    lora_b: torch.Tensor  # (d_out, rank)
    exact: bool  # the edits' own factors (B A = ΔW exactly), not an SVD truncation
    relative_error: float  # ||ΔW - B A||_F / ||ΔW||_F, in float64 (0 when ΔW = 0)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


# ---- the ledger ------------------------------------------------------------------------------


def ledger_state(session: Session, layers: Sequence[int], version: int | None = None) -> LedgerState:
    """The active edits at `version` (default: the head), read with every factor checked against its
    checksum and the hash chain verified. A version must be one the service served: the seq of a done
    operation (or a seq after it with nothing done in between), not one inside a batch."""
    head_seq, head_hash = repo.head(session)
    if version is None or version == head_seq:
        for _ in range(_READ_TRIES):  # a worker may commit between the reads (Postgres reads committed data)
            _, at_head = repo.verified_active_edits(session)
            digest = repo.head_digest(session)
            if repo.head(session) == (head_seq, head_hash):
                return LedgerState(head_seq, head_hash, digest,
                                   [to_engine(a.edit_id, a.batch_id, a.factors, layers) for a in at_head])
            head_seq, head_hash = repo.head(session)
        raise Conflict(f"the ledger moved on during {_READ_TRIES} reads of its head: export a --version")
    if version < 0 or version > head_seq:
        raise InvalidRequest(f"version {version} is not in the ledger: its versions run from 0 to {head_seq}")
    repo.verify_links(session)
    done = [op for op in repo.done_after(session, 0) if op[0] <= version]
    if not done:
        return LedgerState(0, ZERO_HASH, None, [])
    served = session.scalar(select(func.max(Edit.model_version)).where(Edit.seq <= version, Edit.model_version.is_not(None)))
    if served is not None and served > version:
        raise Conflict(f"version {version} was never served: the batch that holds it was applied as version {served}")
    active: dict[str, str] = {}  # edit id -> batch id, in ledger order
    for _, kind, edit_id, batch_id in done:
        if kind == "apply":
            active[edit_id] = batch_id or ""
        else:
            active.pop(edit_id, None)
    last = session.get(Operation, done[-1][0])
    if last is None or last.hash is None:
        raise LedgerCorrupt(f"operation {done[-1][0]} is done but has no hash")
    edits = [to_engine(edit_id, batch_id, repo.verified_factors(session, edit_id), layers)
             for edit_id, batch_id in active.items()]
    return LedgerState(last.seq, last.hash, last.weights_digest, edits)


def replay(editor: Editor, state: LedgerState) -> str:
    """Install the state's edits on the editor (cleared first if it holds any) and return the weights
    digest, checked against the ledger's: the weights are the service's at that version, bit for bit."""
    if len(editor.store) or editor.version:
        editor.clear()
    editor.load(state.edits, version=state.seq)
    digest = editor.weights_digest()
    if state.weights_digest is not None and digest != state.weights_digest:
        raise LedgerCorrupt(
            f"replaying {len(state.edits)} active edits does not reproduce the weights recorded at seq {state.seq}: "
            "the model, dtype or edited layers differ from those the ledger was written with"
        )
    return digest


# ---- the adapter's factors -------------------------------------------------------------------


def module_name(editor: Editor, layer: int) -> str:
    """The edited module's name in the model (PEFT's and vLLM's key for it)."""
    target = editor.adapter.edited_module(layer)
    for name, module in editor.model.named_modules():
        if module is target:
            return name
    raise ValueError(f"layer {layer}: the edited module is not part of the model")


def _relative_error(delta: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor) -> float:
    norm = float(delta.norm())
    if norm == 0.0:
        return 0.0
    return float((delta - lora_b.double() @ lora_a.double()).norm()) / norm


def lora_layers(editor: Editor, edits: Sequence[EditFactors], rank: int | None = None) -> list[LoraLayer]:
    """Per edited layer, (B, A) with B A = Σ r aᵀ over `edits`: their own factors (rank = len(edits)),
    or, with `rank` below that, the rank-`rank` truncated SVD of the exact sum. The editor must hold
    exactly these edits (after `replay`): the SVD starts from its store's exact sum."""
    if not edits:
        raise InvalidRequest("there are no active edits: an adapter would be empty (the merged export is the base model)")
    if rank is not None and rank < 1:
        raise InvalidRequest(f"rank must be at least 1, got {rank}")
    if sorted(e.edit_id for e in edits) != sorted(editor.store.edit_ids):
        raise ValueError("the editor does not hold exactly these edits; replay them first")
    result = []
    for layer in editor.layers:
        delta = editor.store.accumulated(layer)  # (d_out, d_in) float64, the exact Σ r aᵀ
        if rank is None or rank >= len(edits):
            lora_b = torch.stack([e.layers[layer].r for e in edits], dim=1).float().cpu()
            lora_a = torch.stack([e.layers[layer].a for e in edits], dim=0).float().cpu()
            exact = True
        else:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[:rank].sqrt()
            lora_b = (u[:, :rank] * root).float().cpu()
            lora_a = (root[:, None] * vh[:rank]).float().cpu()
            exact = False
        result.append(LoraLayer(layer, module_name(editor, layer), lora_a, lora_b, exact,
                                _relative_error(delta.cpu(), lora_b, lora_a)))
    return result


# ---- writing -----------------------------------------------------------------------------------


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A sibling folder to write into, renamed to `out` when the block succeeds (removed if not).
    `out` must not exist, or be an empty folder."""
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequest(f"{out} exists and is not an empty folder: choose a new output folder")
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_at(state: LedgerState, version: int) -> None:
    if version != state.seq:
        raise ModelMoved(f"the editor is at version {version}, not {state.seq}: replay the state first, "
                         "or read the ledger again at the version now served")


def _knowpatch_version() -> str:
    try:
        return metadata.version("knowpatch")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_info(editor: Editor, state: LedgerState, export_format: ExportFormat, digest: str) -> dict[str, Any]:
    """What an export is: the ledger position, the weights digest, the edits and the model."""
    return {
        "format": export_format,
        "ledger_head_seq": state.seq,
        "ledger_chain_hash": state.chain_hash,
        "weights_digest": digest,
        "active_edits": len(state.edits),
        "edited_layers": list(editor.layers),
        "edited_modules": [module_name(editor, layer) for layer in editor.layers],
        "model": editor.loaded.name,
        "model_fingerprint": editor.loaded.fingerprint,
        "dtype": str(editor.adapter.edited_module(editor.layers[0]).weight.dtype).removeprefix("torch."),
        "method": editor.method,
        "knowpatch_version": _knowpatch_version(),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_info(folder: Path, info: dict[str, Any]) -> None:
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def export_merged(editor: Editor, state: LedgerState, out: Path) -> dict[str, Any]:
    """The edited model as served, as a Hugging Face folder (safetensors, config, tokenizer) plus
    export_info.json. The editor must be at `state` (see `replay`); returns the info written."""
    with editor.reading() as version:
        _check_at(state, version)
        digest = editor.weights_digest()
        if state.weights_digest is not None and digest != state.weights_digest:
            raise LedgerCorrupt(f"the editor's weights do not match the ledger's digest at seq {state.seq}")
        info = export_info(editor, state, "merged", digest)
        # The served tensors themselves, not copies: a swap assigns new tensors and never writes into the
        # old ones, so these stay this version's after the lock is let go, and the save does not hold up
        # edits (nor, behind a waiting swap, generation) on a serving editor.
        weights = editor.model.state_dict()
    with _staging(out) as folder:
        editor.model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        editor.tokenizer.save_pretrained(folder)
        _write_info(folder, info)
    log.info("exported the model at version %d (%d active edits) to %s", state.seq, len(state.edits), out)
    return info


def peft_config(editor: Editor, layers: Sequence[LoraLayer]) -> Any:
    """A LoRA config on exactly the edited modules, with lora_alpha = r (scaling 1)."""
    from peft import LoraConfig

    ranks = {lora.rank for lora in layers}
    if len(ranks) != 1:  # every edit touches every edited layer, and the layers have one shape
        raise ValueError(f"the edited layers have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    base = editor.model.name_or_path or editor.loaded.name
    path = editor.adapter.arch.edited_module  # inside a block, e.g. mlp.down_proj
    leaf = path.rsplit(".", 1)[-1]
    same_leaf = [name for name, _ in editor.adapter.blocks[layers[0].layer].named_modules()
                 if name.rsplit(".", 1)[-1] == leaf]
    # the bare name (what vLLM expects) unless it would also catch another module (GPT-2: attn.c_proj)
    target = leaf if same_leaf == [path] else path
    return LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=[target],
        layers_to_transform=[lora.layer for lora in layers], layers_pattern=editor.adapter.arch.layers,
        fan_in_fan_out=editor.adapter.arch.transposed,  # GPT-2's Conv1D stores (d_in, d_out)
        base_model_name_or_path=base,
    )


def export_peft(editor: Editor, state: LedgerState, out: Path, rank: int | None = None) -> dict[str, Any]:
    """The active edits as a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors, the
    tokenizer, export_info.json) for `PeftModel.from_pretrained(base, out)`. Exact at rank = active
    edits; `rank` truncates each layer by SVD. The editor must be at `state` (see `replay`)."""
    from safetensors.torch import save_file

    with editor.reading() as version:
        _check_at(state, version)
        digest = editor.weights_digest()
        layers = lora_layers(editor, state.edits, rank)
        config = peft_config(editor, layers)
    d_out, d_in = layers[0].lora_b.shape[0], layers[0].lora_a.shape[1]
    if rank is None and len(state.edits) > min(d_out, d_in):
        log.warning("%d edits exceed the rank of a %d x %d weight: an adapter with rank=%d (SVD) would be as exact, "
                    "up to float rounding, and smaller", len(state.edits), d_out, d_in, min(d_out, d_in))
    tensors: dict[str, torch.Tensor] = {}
    for lora in layers:
        tensors[f"base_model.model.{lora.module}.lora_A.weight"] = lora.lora_a.contiguous()
        tensors[f"base_model.model.{lora.module}.lora_B.weight"] = lora.lora_b.contiguous()
    info = export_info(editor, state, "peft", digest) | {"lora": {
        "rank": {str(lora.layer): lora.rank for lora in layers},
        "lora_alpha": {str(lora.layer): lora.rank for lora in layers},
        "scaling": 1.0,
        "dtype": "float32",
        "exact": all(lora.exact for lora in layers),
        "requested_rank": rank,
        "relative_frobenius_error": {str(lora.layer): lora.relative_error for lora in layers},
        "base_model": config.base_model_name_or_path,
    }}
    with _staging(out) as folder:
        config.save_pretrained(str(folder))
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        editor.tokenizer.save_pretrained(folder)
        _write_info(folder, info)
    log.info("exported %d active edits at version %d as a LoRA adapter (rank %s, exact: %s) to %s",
             len(state.edits), state.seq, max(lora.rank for lora in layers), info["lora"]["exact"], out)
    return info


# ---- the served model ------------------------------------------------------------------------


def export_served(editor: Editor, sessions: Sessions, export_format: ExportFormat, out: Path,
                  rank: int | None = None) -> dict[str, Any]:
    """Export what `editor` serves now, as `knowpatch export` would at that version, into `out`.

    The ledger is read at the served version without holding the model (reading many edits' factors
    takes a while, and edits must not wait for it); the export then checks, under the editor's read
    lock, that the version is still the one read, and its weights digest. A swap in between (the worker
    installed a batch) starts it over at the new version."""
    for _ in range(_READ_TRIES):
        with sessions() as session:
            state = ledger_state(session, editor.layers, editor.version)
        try:
            if export_format == "merged":
                return export_merged(editor, state, out)
            return export_peft(editor, state, out, rank=rank)
        except ModelMoved:
            log.info("the served model moved on from version %d during the export; exporting again", state.seq)
    raise Conflict(f"the served model changed version {_READ_TRIES} times during the export: "
                   "edits are being applied now; retry when they are")
