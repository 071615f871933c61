"""Count primitives: slots per (label value, layer, expert), label codes, accumulators over chunks.

All work block by block (``token_blocks``) on ``[tokens, layers, k]`` ids; empty slots (-1) fall into a bin that
is dropped, so no mask array is built.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ..trace import RoutingTrace
from ._source import Label, label_of, token_blocks

#: A label value with fewer tokens than this makes a number too noisy to read: the metric warns.
MIN_TOKENS = 50


def layer_expert_counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[layers, experts]``: how many slots of ``ids`` (``[tokens, layers, k]``, -1 ignored) chose each expert.

    One ``np.bincount`` per block on ``layer * (E + 1) + id + 1``: bin 0 of each layer swallows the empty slots.
    """
    n, n_layers, k = ids.shape
    width = num_experts + 1
    offsets = (np.arange(n_layers, dtype=np.intp) * width + 1)[None, :, None]
    total = np.zeros(n_layers * width, dtype=np.int64)
    for sl in token_blocks(n, n_layers * k):
        idx = ids[sl].astype(np.intp)
        idx += offsets
        total += np.bincount(idx.ravel(), minlength=n_layers * width)
    return total.reshape(n_layers, width)[:, 1:]


def grouped_counts(codes: np.ndarray, n_groups: int, ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[groups, layers, experts]``: slot counts per group (``codes`` ``[tokens]`` in ``[0, groups)``)."""
    n, n_layers, k = ids.shape
    width = num_experts + 1
    cell = n_layers * width
    offsets = (np.arange(n_layers, dtype=np.intp) * width + 1)[None, :, None]
    total = np.zeros(n_groups * cell, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.intp)
    for sl in token_blocks(n, n_layers * k, n_groups * cell):
        idx = ids[sl].astype(np.intp)
        idx += offsets
        idx += (codes[sl] * cell)[:, None, None]
        total += np.bincount(idx.ravel(), minlength=n_groups * cell)
    return total.reshape(n_groups, n_layers, width)[:, :, 1:]


def label_codes(chunk: RoutingTrace, label: Label | None) -> tuple[np.ndarray, np.ndarray]:
    """(codes [tokens], values [V]) of a label in a chunk; without a label every token is in one group 0."""
    if label is None:
        return np.zeros(chunk.num_tokens, np.intp), np.array([0])
    return factorize(label_of(chunk, label))


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes [tokens] intp, uniques)`` by hashing (no sort of the tokens)."""
    import pandas as pd

    codes, uniques = pd.factorize(np.asarray(values), use_na_sentinel=False)
    return codes.astype(np.intp, copy=False), np.asarray(uniques)


class GroupedAccumulator:
    """Sums arrays keyed by label value over chunks whose sets of values differ.

    ``add(values, arrays)`` with ``arrays`` ``[len(values), *shape]``; ``result()`` gives the values sorted
    and the stacked sums ``[values, *shape]``.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.int64) -> None:
        self.shape = shape
        self.dtype = dtype
        self.index: dict[Any, int] = {}
        self.keys: list[Any] = []
        self.rows: list[np.ndarray] = []

    def add(self, values: np.ndarray, arrays: np.ndarray) -> None:
        for value, arr in zip(values.tolist(), arrays, strict=True):
            i = self.index.get(value)
            if i is None:
                self.index[value] = len(self.keys)
                self.keys.append(value)
                self.rows.append(np.array(arr, dtype=self.dtype, copy=True))
            else:
                self.rows[i] += arr

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.keys:
            return np.array([]), np.zeros((0, *self.shape), dtype=self.dtype)
        order = sorted(range(len(self.keys)), key=lambda i: _sort_key(self.keys[i]))
        return np.array([self.keys[i] for i in order]), np.stack([self.rows[i] for i in order])


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, value) if not (isinstance(value, float) and math.isnan(value)) else (2, 0)
    return (1, str(value))


def warn_small(name: str, values: np.ndarray, tokens: np.ndarray, *, minimum: int = MIN_TOKENS) -> None:
    """Warn once per call about label values with fewer than ``minimum`` tokens."""
    small = [(v, int(t)) for v, t in zip(values.tolist(), np.asarray(tokens).tolist(), strict=True) if t < minimum]
    if small:
        listed = ", ".join(f"{v!r} ({t} tokens)" for v, t in small[:8])
        more = "" if len(small) <= 8 else f" and {len(small) - 8} more"
        warnings.warn(
            f"label {name!r} has values with fewer than {minimum} tokens: {listed}{more}; their numbers are too "
            "noisy to read. Capture more text for them or leave them out.",
            stacklevel=3,
        )


def weighted_counts(ids: np.ndarray, w: np.ndarray, num_experts: int, codes: np.ndarray, n_values: int
                    ) -> np.ndarray:
    """float64 ``[values, layers, experts]``: summed routing weights per label code (NaN weights count 0)."""
    n, n_layers, k = ids.shape
    width = num_experts + 1
    size = n_values * n_layers * width
    offsets = (np.arange(n_layers, dtype=np.intp) * width + 1)[None, :, None]
    out = np.zeros(size, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.intp)
    for sl in token_blocks(n, n_layers * k, size):
        idx = ids[sl].astype(np.intp)
        idx += offsets
        idx += (codes[sl] * n_layers * width)[:, None, None]
        weights = np.where(ids[sl] >= 0, np.nan_to_num(w[sl]), 0.0).astype(np.float64)
        out += np.bincount(idx.ravel(), weights=weights.ravel(), minlength=size)
    return out.reshape(n_values, n_layers, width)[:, :, 1:]
