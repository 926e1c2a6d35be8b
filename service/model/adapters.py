"""Architecture facts as a table keyed by `model_type`, and the module lookups built on it."""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from service.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Architecture:
    """Where things are; the output head comes from `get_output_embeddings()`."""

    base: str  # attribute of the *ForCausalLM holding the decoder stack
    layers: str  # attribute of `base`: the ModuleList of blocks
    final_norm: str  # attribute of `base`
    edited_module: str  # path inside a block: the MLP output projection
    position_embedding: str | None  # attribute of `base` added to inputs_embeds (absolute positions)
    transposed: bool  # weight stored (d_in, d_out), as GPT-2's Conv1D does


_LLAMA = Architecture("model", "layers", "norm", "mlp.down_proj", None, False)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "smollm3": _LLAMA,
    "gpt2": Architecture("transformer", "h", "ln_f", "mlp.c_proj", "wpe", True),
    "gptj": Architecture("transformer", "h", "ln_f", "mlp.fc_out", None, False),
    "gpt_neox": Architecture("gpt_neox", "layers", "final_layer_norm", "mlp.dense_4h_to_h", None, False),
}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported architectures: {supported}"
        ) from None


def cache_keyword(module: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def default_layers(num_layers: int) -> list[int]:
    """A band of up to five early-middle layers, as the paper uses (layers 4-8 of 30-32)."""
    start = max(1, round(0.13 * num_layers))
    count = max(1, min(5, num_layers - start - 1))
    return list(range(start, start + count))


class _ZeroPositions(nn.Module):
    """Stands in for an absolute position embedding when the input already carries positions."""

    def __init__(self, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids.new_zeros(*position_ids.shape, self.hidden_size, dtype=self.dtype)


class ModelAdapter:
    """Resolves an architecture's modules on one model instance."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.arch = architecture_for(model.config.model_type)
        self.base: nn.Module = getattr(model, self.arch.base)
        self.blocks: nn.ModuleList = getattr(self.base, self.arch.layers)
        self.head: nn.Module = model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    def edited_module(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.arch.edited_module)

    def weight(self, layer: int) -> torch.Tensor:
        """The edited weight as (d_out, d_in), a view on the parameter."""
        weight = self.edited_module(layer).weight
        return weight.T if self.arch.transposed else weight

    def stored_layout(self, layer: int, value: torch.Tensor) -> torch.Tensor:
        """A (d_out, d_in) float tensor in the parameter's layout, dtype and device."""
        parameter = self.edited_module(layer).weight
        stored = value.T if self.arch.transposed else value
        if stored.shape != parameter.shape:
            raise ValueError(f"layer {layer}: weight shape {tuple(stored.shape)} != {tuple(parameter.shape)}")
        return stored.to(dtype=parameter.dtype, device=parameter.device).contiguous()

    def assign(self, layer: int, stored: torch.Tensor) -> None:
        """Swap in a tensor from `stored_layout`; the caller holds the model's write lock."""
        self.edited_module(layer).weight.data = stored

    def slice(self, start: int, stop: int) -> nn.Module:
        """The decoder stack restricted to blocks [start, stop), without the final norm.

        A shallow copy that shares every parameter with the model, so weight swaps show
        through and nothing on the shared model is mutated (generation may run meanwhile).
        Fed with `inputs_embeds`, it returns the residual stream after block stop-1.
        """
        piece = copy.copy(self.base)
        piece._modules = dict(self.base._modules)
        setattr(piece, self.arch.layers, nn.ModuleList(list(self.blocks)[start:stop]))
        setattr(piece, self.arch.final_norm, nn.Identity())
        if start > 0 and self.arch.position_embedding:
            dtype = getattr(self.base, self.arch.position_embedding).weight.dtype
            setattr(piece, self.arch.position_embedding, _ZeroPositions(self.hidden_size, dtype))
        return piece

    def final_norm(self) -> nn.Module:
        return getattr(self.base, self.arch.final_norm)

    def logits_at(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits for residual vectors (..., H) of the last block: final norm, then head."""
        return self.head(self.final_norm()(residual))
