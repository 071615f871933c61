"""Languages: expert usage per language, divergence between languages, and distance to a reference language.

Language codes (``"de"``) are shown by name (``"German"``) everywhere; see :func:`language_name`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .. import metrics as M
from ..trace import RoutingTrace
from ._common import language_name, metric_frame, require_columns
from .contrast import divergence_matrix_heatmap, divergence_over_depth
from .specialization import Normalize, label_usage_heatmap

__all__ = [
    "divergence_to_reference",
    "language_divergence_heatmap",
    "language_name",
    "language_usage_heatmap",
]


def language_usage_heatmap(
    data: RoutingTrace | pd.DataFrame | Any,
    *,
    label: str = "lang",
    layers: Sequence[int] | None = None,
    normalize: Normalize = "lift",
    languages: Sequence[str] | None = None,
    title: str | None = None,
    min_count: int | None = None,
) -> go.Figure:
    """Languages (rows, by name) x experts, one heatmap per decoder layer behind a slider.

    ``data``: a trace or a ``label_usage(trace, "lang")`` frame. Defaults to ``normalize="lift"`` (share of the language's slots over the expert's overall share), which
    makes language-specific experts stand out; see :func:`label_usage_heatmap`.
    """
    return label_usage_heatmap(
        data,
        label,
        layers=layers,
        normalize=normalize,
        values=languages,
        title=title
        or ("Expert preference by language (lift over overall share)" if normalize == "lift" else None),
        min_count=min_count,
    )


def language_divergence_heatmap(
    matrix: Any,
    languages: Sequence[Any] | None = None,
    *,
    label: str = "lang",
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    value: str = "js",
    measure: str = "Jensen-Shannon divergence (bits)",
    title: str | None = None,
) -> go.Figure:
    """Languages x languages divergence heatmap, languages by name, one per decoder layer behind a slider.

    ``matrix``: a trace (``language_divergence`` is computed), a ``language_divergence`` pairs frame
    (``layer, a, b, js``), or one square matrix (DataFrame or array with ``languages``).
    """
    if not isinstance(matrix, (pd.DataFrame, np.ndarray)):
        matrix = metric_frame(matrix, M.language_divergence, label=label)
    return divergence_matrix_heatmap(
        matrix, languages, label="lang", value=value, layers=layers, measure=measure, layer=layer, title=title
    )


def divergence_to_reference(
    frame: Any,
    *,
    group: str = "lang",
    value: str = "divergence",
    reference: str | None = None,
    floor: str | None = None,
    title: str | None = None,
    y: str | None = None,
    color: str | None = None,
) -> go.Figure:
    """Divergence of each language's routing from a reference language, over decoder layers.

    ``y`` and ``color`` are aliases of ``value`` and ``group`` (the role names every plot uses).

    ``frame``: a ``reference_divergence`` frame (``<group>, layer, divergence`` and ``ci_low, ci_high`` drawn
    as error bars) or a trace (computed with ``reference``, default English). The reference's own rows (all
    zero) are left out and named in the title.
    """
    value, group = y or value, color or group
    if not isinstance(frame, pd.DataFrame):
        frame = metric_frame(frame, M.reference_divergence, label=group, reference=reference or "en")
    require_columns(frame, ["layer", group, value], "divergence_to_reference")
    if reference is None:
        zero = frame.groupby(group)[value].apply(lambda v: bool(np.all(np.nan_to_num(v) == 0)))
        refs = zero[zero].index.tolist()
        reference = refs[0] if len(refs) == 1 else None
    if reference is not None:
        frame = frame[frame[group].astype(str) != str(reference)]
    ref = f" from {language_name(reference)}" if reference is not None else ""
    return divergence_over_depth(
        frame,
        value=value,
        color=group,
        label="lang",
        floor=floor,
        title=title or f"Routing divergence{ref} by layer",
    )
