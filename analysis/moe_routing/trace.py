"""RoutingTrace: what every router decided, as arrays with named dimensions.

Dimensions used throughout the package:

- ``tokens``: real (non-padding) tokens, batch-major in the order they were captured;
- ``layers``: MoE layers only, in model order (``trace.layers`` maps them to decoder-layer indices);
- ``k``: routing slots per token (the model's top-k);
- ``experts``: routed experts of a layer.

A slot whose ``expert_ids`` value is ``-1`` carries no expert (a token dropped at capacity by
switch_transformers, a "skip" slot of zaya, or padding of a layer with a smaller k): metrics ignore it.

``expert_ids`` are int16, or int32 for a model with more than 32,767 experts (``expert_dtype``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import TraceError

NO_EXPERT = -1
LabelPer = Literal["token", "doc"]


def expert_dtype(num_experts: int) -> np.dtype:
    """The dtype of ``expert_ids``: int16, or int32 when ids above 32,767 exist (``num_experts > 32767``)."""
    return np.dtype(np.int16) if int(num_experts) <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _as_array(name: str, value: Any, dtype: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise TraceError(f"{name} must have {ndim} dimensions, got shape {arr.shape}.")
    wants_int = np.issubdtype(np.dtype(dtype), np.integer) and arr.size and not np.issubdtype(arr.dtype, np.integer)
    if wants_int and (arr.dtype.kind not in "fb" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
        raise TraceError(f"{name} must hold integers, got dtype {arr.dtype} with non-integer values.")
    if np.issubdtype(np.dtype(dtype), np.integer) and arr.size and arr.dtype != dtype:
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise TraceError(f"{name} holds values in [{lo}, {hi}], outside the {np.dtype(dtype)} range; "
                             "they cannot be stored faithfully.")
    return np.ascontiguousarray(arr, dtype=dtype)


def _as_expert_ids(value: Any, num_experts: int) -> np.ndarray:
    """``[tokens, layers, k]`` ids, range-checked against ``num_experts`` *before* any narrowing cast."""
    arr = np.asarray(value)
    if arr.ndim != 3:
        raise TraceError(f"expert_ids must have 3 dimensions, got shape {arr.shape}.")
    if arr.size:
        arr = _as_array("expert_ids", arr, np.int64, 3) if arr.dtype.kind != "i" else arr
        lo, hi = int(arr.min()), int(arr.max())
        if lo < NO_EXPERT or hi >= num_experts:
            raise TraceError(
                f"expert_ids range [{lo}, {hi}] is outside [-1, num_experts={num_experts}); "
                "pass the model's num_experts (ids >= num_experts are not routed experts)."
            )
    return np.ascontiguousarray(arr, dtype=expert_dtype(num_experts))


def _is_missing(arr: np.ndarray) -> np.ndarray:
    """bool ``[n]``: None / NaN / pandas NA entries of an object array."""
    import pandas as pd

    return np.asarray(pd.isna(arr), dtype=bool)


def _label_array(key: str, value: Any) -> np.ndarray:
    """A label as a 1-D array; missing values (None, NaN among strings) are refused, never turned into 'None'."""
    raw = value if isinstance(value, np.ndarray) else np.asarray(list(value) if not np.isscalar(value) else value,
                                                                   dtype=object)
    if raw.dtype.kind == "O":
        missing = _is_missing(raw) if raw.ndim == 1 else np.zeros(0, dtype=bool)
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            raise TraceError(
                f"label {key!r} has {int(missing.sum())} missing values (None / NaN; the first at index {first}). "
                "Fill them with an explicit value (e.g. 'unknown') or drop those texts; a missing label is "
                "never stored as the text 'None'."
            )
        arr = np.asarray(raw.tolist()) if raw.ndim == 1 and raw.size else raw
        if arr.dtype.kind == "O":
            arr = arr.astype(str)
        return arr
    return raw


def _per_doc(arr: np.ndarray, doc_ids: np.ndarray, *, by_index: bool) -> np.ndarray | None:
    """One value per distinct document id, in id order; with ``by_index`` also ``arr[doc_id]`` when the ids
    index ``arr`` (documents without tokens). None when neither fits."""
    if not len(doc_ids):
        return arr[:0]
    docs, inverse = np.unique(doc_ids, return_inverse=True)
    if len(arr) == len(docs):
        return arr[inverse]
    if by_index and docs[0] >= 0 and docs[-1] < len(arr):
        return arr[doc_ids]
    return None


def expand_label(name: str, values: Any, doc_ids: np.ndarray, per: LabelPer | None = None) -> np.ndarray:
    """One value per token ``[tokens]`` from one value per token (``per="token"``) or per document (``"doc"``).

    Per-document values are taken in order of the distinct document ids (one per document), or, with
    ``per="doc"`` and more values than documents, indexed by document id (``values[doc_id]``: documents that
    left no token). Without ``per`` the count decides; a count that fits both readings with different results
    is refused: say ``per="token"`` or ``per="doc"``.
    """
    doc_ids = np.asarray(doc_ids)
    arr = _label_array(name, values)
    n = len(doc_ids)
    if arr.ndim != 1:
        raise TraceError(f"label {name!r} must be one value per token or per document, got shape {arr.shape}.")
    n_docs = len(np.unique(doc_ids))
    if per not in (None, "token", "doc"):
        raise TraceError(f"per must be 'token' or 'doc', got {per!r}.")
    as_doc = _per_doc(arr, doc_ids, by_index=per == "doc") if per in (None, "doc") else None
    if per == "token" or (per is None and len(arr) == n and (as_doc is None or np.array_equal(as_doc, arr))):
        if len(arr) != n:
            raise TraceError(f"label {name!r} must be one value per token ([{n}]), got {len(arr)} (per='token').")
        return arr
    if per is None and len(arr) == n:
        raise TraceError(
            f"label {name!r} has {len(arr)} values: that fits one per token and one per document, which give "
            "different labels; say which with per='token' or per='doc'."
        )
    if as_doc is None:
        raise TraceError(
            f"label {name!r} has {len(arr)} values; give one per document ({n_docs} documents, ids "
            f"{'0..' + str(int(doc_ids.max())) if n else 'none'}) or one per token ({n})."
        )
    return as_doc


@dataclass(eq=False)
class RoutingTrace:
    """Routing decisions of one model over a set of tokens.

    Attributes:
        expert_ids: int16 ``[tokens, layers, k]`` (int32 beyond 32,767 experts); ``-1`` marks an empty slot.
        weights: float32 ``[tokens, layers, k]``, the weights the model multiplied each expert's output with.
        router_logits: float16 ``[tokens, layers, experts]`` or None (capture with ``logits=True``).
        token_ids: int32 ``[tokens]``.
        positions: int32 ``[tokens]``, position of the token in its sequence (0-based, padding excluded).
        doc_ids: int64 ``[tokens]``, which input text (or chunk of one) the token came from.
        layers: decoder-layer index of each MoE layer.
        num_experts: routed experts per layer (the largest, where layers differ).
        top_k: slots per token.
        labels: per-token labels, each ``[tokens]`` (e.g. ``lang``, ``domain``, ``phase``).
        model_name: Hugging Face id or path of the model.
        meta: free-form extra facts (adapter notes, config hash, ...), JSON-serialisable.
    """

    expert_ids: np.ndarray
    weights: np.ndarray
    layers: tuple[int, ...]
    num_experts: int
    token_ids: np.ndarray
    positions: np.ndarray
    doc_ids: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    router_logits: np.ndarray | None = None
    model_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_experts = int(self.num_experts)
        if self.num_experts <= 0:
            raise TraceError(f"num_experts must be positive, got {self.num_experts}.")
        self.expert_ids = _as_expert_ids(self.expert_ids, self.num_experts)
        self.weights = _as_array("weights", self.weights, np.float32, 3)
        n, n_layers, _k = self.expert_ids.shape
        if self.weights.shape != self.expert_ids.shape:
            raise TraceError(
                f"weights shape {self.weights.shape} does not match expert_ids shape {self.expert_ids.shape}; "
                "both are [tokens, layers, k]."
            )
        self.layers = tuple(int(x) for x in self.layers)
        if any(x < 0 for x in self.layers):
            raise TraceError(f"layers must be decoder-layer indices >= 0, got {list(self.layers)}.")
        if len(self.layers) != n_layers:
            raise TraceError(
                f"layers names {len(self.layers)} MoE layers but the arrays hold {n_layers} "
                "(expert_ids is [tokens, layers, k])."
            )
        if len(set(self.layers)) != len(self.layers):
            raise TraceError(f"layers must be distinct decoder-layer indices, got {self.layers}.")
        self.token_ids = _as_array("token_ids", self.token_ids, np.int32, 1)
        self.positions = _as_array("positions", self.positions, np.int32, 1)
        self.doc_ids = _as_array("doc_ids", self.doc_ids, np.int64, 1)
        for name in ("token_ids", "positions", "doc_ids"):
            if len(getattr(self, name)) != n:
                raise TraceError(f"{name} has {len(getattr(self, name))} entries, expected one per token ({n}).")
        labels = {}
        for key, value in (self.labels or {}).items():
            arr = _label_array(str(key), value)
            if arr.ndim != 1 or len(arr) != n:
                raise TraceError(f"label {key!r} must be one value per token ([{n}]), got shape {arr.shape}.")
            labels[str(key)] = arr
        self.labels = labels
        if self.router_logits is not None:
            self.router_logits = _as_array("router_logits", self.router_logits, np.float16, 3)
            if self.router_logits.shape[:2] != (n, n_layers):
                raise TraceError(
                    f"router_logits shape {self.router_logits.shape} must be [tokens={n}, layers={n_layers}, experts]."
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        expert_ids: Any,
        weights: Any | None = None,
        *,
        layers: Sequence[int] | None = None,
        num_experts: int,
        labels: Mapping[str, Any] | None = None,
        token_ids: Any | None = None,
        doc_ids: Any | None = None,
        positions: Any | None = None,
        router_logits: Any | None = None,
        model_name: str = "",
        meta: Mapping[str, Any] | None = None,
        per: LabelPer = "token",
    ) -> RoutingTrace:
        """Build a trace from plain arrays (tests, imports from other tools).

        ``expert_ids`` is ``[tokens, layers, k]``. Missing ``weights`` (an engine that reports ids only) become
        NaN and ``meta["has_weights"]`` is False, so weight-based metrics can refuse clearly. Missing
        ``doc_ids`` put every token in document 0; missing ``positions`` count tokens within each document.
        ``labels`` hold one value per token (``per="token"``, the default) or per document (``per="doc"``, in
        order of document id).
        """
        ids = _as_expert_ids(expert_ids, int(num_experts))
        n, n_layers, _ = ids.shape
        meta = dict(meta or {})
        if weights is None:
            w = np.full(ids.shape, np.nan, dtype=np.float32)
            meta.setdefault("has_weights", False)
        else:
            w = weights
        layers = tuple(range(n_layers)) if layers is None else tuple(layers)
        docs = np.zeros(n, dtype=np.int64) if doc_ids is None else _as_array("doc_ids", doc_ids, np.int64, 1)
        if positions is None:
            positions = _positions_within_docs(docs)
        toks = np.full(n, -1, dtype=np.int32) if token_ids is None else token_ids
        labels = {k: expand_label(k, v, docs, per) for k, v in (labels or {}).items()}
        return cls(
            expert_ids=ids,
            weights=w,
            layers=layers,
            num_experts=num_experts,
            token_ids=toks,
            positions=positions,
            doc_ids=docs,
            labels=labels,
            router_logits=router_logits,
            model_name=model_name,
            meta=meta,
        )

    @classmethod
    def concat(cls, traces: Iterable[RoutingTrace]) -> RoutingTrace:
        """Concatenate traces of the same model along ``tokens`` (labels must have the same names)."""
        traces = list(traces)
        if not traces:
            raise TraceError("concat needs at least one trace.")
        first = traces[0]
        for t in traces[1:]:
            if t.layers != first.layers or t.num_experts != first.num_experts or t.top_k != first.top_k:
                raise TraceError(
                    "cannot concatenate traces of different models or configurations: "
                    f"layers {first.layers} / {t.layers}, num_experts {first.num_experts} / {t.num_experts}, "
                    f"top_k {first.top_k} / {t.top_k}."
                )
            if set(t.labels) != set(first.labels):
                raise TraceError(f"label names differ: {sorted(first.labels)} vs {sorted(t.labels)}.")
            if (t.router_logits is None) != (first.router_logits is None):
                raise TraceError("cannot concatenate a trace with router logits and one without.")
        logits = None if first.router_logits is None else np.concatenate([t.router_logits for t in traces])
        return cls(
            expert_ids=np.concatenate([t.expert_ids for t in traces]),
            weights=np.concatenate([t.weights for t in traces]),
            layers=first.layers,
            num_experts=first.num_experts,
            token_ids=np.concatenate([t.token_ids for t in traces]),
            positions=np.concatenate([t.positions for t in traces]),
            doc_ids=np.concatenate([t.doc_ids for t in traces]),
            labels={k: np.concatenate([t.labels[k] for t in traces]) for k in first.labels},
            router_logits=logits,
            model_name=first.model_name,
            meta=dict(first.meta),
        )

    # ------------------------------------------------------------------ shape facts
    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def has_weights(self) -> bool:
        return bool(self.meta.get("has_weights", True))

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        labels = ", ".join(sorted(self.labels)) or "none"
        logits = "yes" if self.router_logits is not None else "no"
        return (
            f"RoutingTrace(model={self.model_name or '?'}, tokens={self.num_tokens}, moe_layers={self.num_layers} "
            f"{list(self.layers)}, experts={self.num_experts}, top_k={self.top_k}, labels=[{labels}], "
            f"logits={logits})"
        )

    def layer_index(self, layer: int) -> int:
        """Position in the ``layers`` dimension of decoder layer ``layer``; a clear error when it is not MoE."""
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise TraceError(
                f"layer {layer} is not a MoE layer of this trace; MoE layers are {list(self.layers)}."
            ) from None

    # ------------------------------------------------------------------ derived views
    def top1(self) -> np.ndarray:
        """int16 ``[tokens, layers]``: the expert of the slot with the largest weight (ties: first slot).

        Without weights (imports that record ids only) slot 0 is taken, which is the engine's first choice.
        """
        from .metrics._ranking import top1  # the one ranking rule (block by block: bounded temporaries)

        return top1(self)

    def sorted_by_weight(self) -> RoutingTrace:
        """A copy whose slots are ordered by descending weight (DeepSeek-style routers use unsorted top-k)."""
        if not self.has_weights:
            return self
        w = np.where(self.expert_ids >= 0, self.weights, -np.inf)
        order = np.argsort(-np.nan_to_num(w, nan=-np.inf), axis=2, kind="stable")
        return replace(
            self,
            expert_ids=np.take_along_axis(self.expert_ids, order, axis=2),
            weights=np.take_along_axis(self.weights, order, axis=2),
        )

    def select(self, mask: np.ndarray | None = None, *, layers: Sequence[int] | None = None) -> RoutingTrace:
        """A sub-trace: tokens where ``mask`` is True (``[tokens]`` bool or indices) and/or some MoE layers."""
        arr = None if mask is None else np.asarray(mask)
        if arr is not None and arr.dtype == bool and len(arr) != self.num_tokens:
            raise TraceError(f"mask has {len(arr)} entries, the trace has {self.num_tokens} tokens.")
        idx: Any = slice(None) if arr is None else arr
        lidx = slice(None) if layers is None else [self.layer_index(x) for x in layers]
        new_layers = self.layers if layers is None else tuple(int(x) for x in layers)
        logits = None
        if self.router_logits is not None:
            logits = self.router_logits[idx][:, lidx]
        return RoutingTrace(
            expert_ids=self.expert_ids[idx][:, lidx],
            weights=self.weights[idx][:, lidx],
            layers=new_layers,
            num_experts=self.num_experts,
            token_ids=self.token_ids[idx],
            positions=self.positions[idx],
            doc_ids=self.doc_ids[idx],
            labels={k: v[idx] for k, v in self.labels.items()},
            router_logits=logits,
            model_name=self.model_name,
            meta=dict(self.meta),
        )

    def where(self, **labels: Any) -> RoutingTrace:
        """Tokens whose labels equal the given values, e.g. ``trace.where(lang="de")``."""
        mask = np.ones(self.num_tokens, dtype=bool)
        for key, value in labels.items():
            mask &= self.label(key) == value
        return self.select(mask)

    def label(self, name: str) -> np.ndarray:
        """The per-token label ``name``; a clear error listing the labels there are."""
        if name not in self.labels:
            raise TraceError(
                f"this trace has no label {name!r}; its labels are {sorted(self.labels) or 'none'}. "
                "Pass labels= to capture_corpus (or RoutingTrace.from_arrays) to add one."
            )
        return self.labels[name]

    def with_labels(self, mapping: Mapping[str, Any] | None = None, /, *, per: LabelPer = "token",
                    **labels: Any) -> RoutingTrace:
        """A copy with extra (or replaced) labels: one value per token (``per="token"``, the default) or per
        document (``per="doc"``, in order of document id). A label named ``per`` goes in ``mapping``."""
        new = dict(self.labels)
        for k, v in {**(mapping or {}), **labels}.items():
            new[k] = expand_label(k, v, self.doc_ids, per)
        return replace(self, labels=new)

    def to_frame(self, *, layers: Sequence[int] | None = None):
        """Tidy long-form ``pandas.DataFrame``: one row per (token, layer, slot) with labels as columns.

        Columns: ``token, doc_id, position, token_id, layer, slot, expert, weight`` and one per label.
        Empty slots (expert -1) are left out.
        """
        import pandas as pd

        t = self if layers is None else self.select(layers=layers)
        n, n_layers, k = t.expert_ids.shape
        tok = np.repeat(np.arange(n), n_layers * k)
        frame = {
            "token": tok,
            "doc_id": t.doc_ids[tok],
            "position": t.positions[tok],
            "token_id": t.token_ids[tok],
            "layer": np.tile(np.repeat(np.asarray(t.layers, dtype=np.int32), k), n),
            "slot": np.tile(np.arange(k, dtype=np.int8), n * n_layers),
            "expert": t.expert_ids.reshape(-1),
            "weight": t.weights.reshape(-1),
        }
        for key, value in t.labels.items():
            frame[key] = value[tok]
        df = pd.DataFrame(frame)
        return df[df["expert"] >= 0].reset_index(drop=True)

    def to_xarray(self):
        """``xarray.Dataset`` with dims ``token, layer, slot`` (coordinates: decoder-layer indices, labels)."""
        import xarray as xr

        coords = {"layer": list(self.layers), "token": np.arange(self.num_tokens)}
        data = {
            "expert_ids": (("token", "layer", "slot"), self.expert_ids),
            "weights": (("token", "layer", "slot"), self.weights),
        }
        if self.router_logits is not None:
            data["router_logits"] = (("token", "layer", "expert"), self.router_logits)
        for name in ("token_ids", "positions", "doc_ids"):
            coords[name] = ("token", getattr(self, name))
        for key, value in self.labels.items():
            coords[key] = ("token", value)
        return xr.Dataset(data, coords=coords, attrs={"model_name": self.model_name, "num_experts": self.num_experts})

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False, tokens_per_shard: int | None = None,
             weights_dtype: Literal["auto", "float32", "float16"] = "float32") -> Path:
        """Write the trace as a trace directory (Parquet shards + JSON manifest + document index).

        ``tokens_per_shard`` splits it into shards of about that many tokens (documents never span shards);
        ``weights_dtype``: ``"float16"`` rounds weights to 16 bits, ``"auto"`` stores 16 bits where lossless.
        Returns the path.
        """
        from .store import write_trace

        return write_trace(self, path, overwrite=overwrite, tokens_per_shard=tokens_per_shard,
                           weights_dtype=weights_dtype)

    @classmethod
    def load(cls, path: str | Path, *, layers: Sequence[int] | None = None) -> RoutingTrace:
        """Read a trace directory written by ``save`` or ``capture_corpus`` into memory."""
        from .store import TraceReader

        return TraceReader(path).read(layers=layers)

    def equals(self, other: RoutingTrace) -> bool:
        """Same tokens, same decisions, same labels (exact)."""
        if self.layers != other.layers or self.num_experts != other.num_experts:
            return False
        for name in ("expert_ids", "weights", "token_ids", "positions", "doc_ids"):
            if not np.array_equal(getattr(self, name), getattr(other, name), equal_nan=name == "weights"):
                return False
        if set(self.labels) != set(other.labels):
            return False
        if any(not np.array_equal(self.labels[k], other.labels[k]) for k in self.labels):
            return False
        if (self.router_logits is None) != (other.router_logits is None):
            return False
        if self.router_logits is None or other.router_logits is None:
            return True
        return np.array_equal(self.router_logits, other.router_logits, equal_nan=True)


def _positions_within_docs(doc_ids: np.ndarray) -> np.ndarray:
    """0-based position of each token within its run of equal doc ids."""
    n = len(doc_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    starts = np.r_[True, doc_ids[1:] != doc_ids[:-1]]
    start_idx = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return (np.arange(n) - start_idx).astype(np.int32)
