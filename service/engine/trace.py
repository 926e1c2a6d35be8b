"""Forward hooks on the edited modules that capture keys and add not-yet-committed updates.

The hooks stay registered for the editor's lifetime and act only in the thread (context) that
entered `LayerTrace.tracing`, so generation running meanwhile never sees a pending update and
the shared model is never mutated while computing an edit.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from service.model.adapters import ModelAdapter

# A pending update of one layer: (A, R) with ΔW = R Aᵀ; A (d_in, n), R (d_out, n).
Pending = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _TraceState:
    capture: frozenset[int]
    pending: Pending
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


class LayerTrace:
    def __init__(self, adapter: ModelAdapter, layers: Iterable[int]) -> None:
        self._state: ContextVar[_TraceState | None] = ContextVar(f"knowpatch-trace-{id(self)}", default=None)
        self._handles = [
            adapter.edited_module(layer).register_forward_hook(self._make_hook(layer)) for layer in layers
        ]

    def _make_hook(self, layer: int):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            state = self._state.get()
            if state is None:
                return None
            keys = inputs[0]  # (B, T, d_in)
            if layer in state.capture:
                state.captured[layer] = keys.detach()
            pending = state.pending.get(layer)
            if pending is None:
                return None
            a, r = (t.to(keys.device) for t in pending)  # a no-op unless layers span devices
            update = (keys.to(a.dtype) @ a) @ r.T  # (B, T, d_out), low rank: never densify ΔW
            return output + update.to(output.dtype)

        return hook

    @contextmanager
    def tracing(self, capture: Iterable[int] = (), pending: Pending | None = None) -> Iterator[dict[int, torch.Tensor]]:
        """Within the block, forward passes in this context record inputs of `capture` layers."""
        state = _TraceState(frozenset(capture), dict(pending or {}))
        token = self._state.set(state)
        try:
            yield state.captured
        finally:
            self._state.reset(token)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
