"""Byte encoding of the stored rank-one factors.

Principle 1 (weights are a pure function of the ledger) requires that a factor read back is bit for
bit the factor that was applied, on any machine: arrays are stored little-endian in C order, with
their dtype and shape beside them, and a checksum that the hash chain commits to.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from service.errors import LedgerCorrupt

FACTOR_DTYPE = "float32"


def encode_array(a: np.ndarray) -> tuple[bytes, str, list[int]]:
    """Return (little-endian C-order bytes, dtype name, shape) of a numeric array."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"cannot store an array of dtype {arr.dtype}; only bool/int/float arrays are stored")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return little.tobytes(order="C"), arr.dtype.name, [int(n) for n in arr.shape]


def decode_array(data: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """Inverse of encode_array: a writable array in native byte order."""
    dt = np.dtype(dtype)
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(data) != expected:
        raise LedgerCorrupt(
            f"stored array holds {len(data)} bytes but dtype {dtype} and shape {list(shape)} need {expected}"
        )
    little = np.frombuffer(data, dtype=dt.newbyteorder("<")).reshape(tuple(shape))
    return little.astype(dt, copy=True)  # copy: frombuffer arrays are read-only and alias `data`


def factor_checksum(
    dtype: str, r_shape: Sequence[int], a_shape: Sequence[int], k_shape: Sequence[int], r: bytes, a: bytes, k: bytes
) -> str:
    """sha256 hex over dtype, shapes and the three byte strings (length-prefixed, so unambiguous)."""
    h = hashlib.sha256()
    header = {"dtype": dtype, "shapes": [list(map(int, r_shape)), list(map(int, a_shape)), list(map(int, k_shape))]}
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for blob in (r, a, k):
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


@dataclass(eq=False)  # eq=False: == on arrays is elementwise, so dataclass equality would be wrong
class StoredFactor:
    """One edit's rank-one update of one layer: delta W_l = r a^T; k is the edit's key at that layer."""

    layer: int
    r: np.ndarray
    a: np.ndarray
    k: np.ndarray

    def __post_init__(self) -> None:
        # Strict on purpose: silently casting (e.g. float64 -> float32) would make the replayed weights
        # differ from the weights the worker actually served.
        for name in ("r", "a", "k"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 1:
                got = f"{type(arr).__name__} {getattr(arr, 'dtype', '?')} ndim={getattr(arr, 'ndim', '?')}"
                raise ValueError(f"StoredFactor.{name} of layer {self.layer} must be a 1-D float32 ndarray, got {got}")

    def encoded(self) -> dict[str, object]:
        """Column values of an edit_factors row (without edit_id)."""
        r, _, r_shape = encode_array(self.r)
        a, _, a_shape = encode_array(self.a)
        k, _, k_shape = encode_array(self.k)
        return {
            "layer": int(self.layer), "r": r, "a": a, "k": k, "dtype": FACTOR_DTYPE,
            "r_shape": r_shape, "a_shape": a_shape, "k_shape": k_shape,
            "checksum": factor_checksum(FACTOR_DTYPE, r_shape, a_shape, k_shape, r, a, k),
        }

    def checksum(self) -> str:
        return str(self.encoded()["checksum"])
