"""Contrasts between conditions (languages, prompts, models): divergence matrices, divergence over depth and
differential expert usage with confidence intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import MetricError
from ._common import category_axis, frame_layers, label_names, layer_slider, require_columns
from .theme import DIVERGING, SEQUENTIAL, colorway


def pair_matrix(
    frame: pd.DataFrame, layer: int, value: str = "js", names: Sequence[Any] | None = None
) -> tuple[list[Any], np.ndarray]:
    """Group names and the symmetric ``[groups, groups]`` matrix of ``value`` at ``layer`` from a pairs frame
    (``layer, a, b, <value>``, one row per unordered pair). Diagonal 0; pairs without a row are NaN."""
    sub = frame[frame["layer"] == layer]
    if names is None:
        names = sorted(set(sub["a"].tolist()) | set(sub["b"].tolist()), key=str)
    names = list(names)
    pos = {n: i for i, n in enumerate(names)}
    mat = np.full((len(names), len(names)), np.nan)
    np.fill_diagonal(mat, 0.0)
    sub = sub[sub["a"].isin(pos) & sub["b"].isin(pos)]
    i = sub["a"].map(pos).to_numpy(dtype=int)
    j = sub["b"].map(pos).to_numpy(dtype=int)
    v = sub[value].to_numpy(dtype=np.float64)
    mat[i, j] = v
    mat[j, i] = v
    return names, mat


def divergence_matrix_heatmap(
    matrix: pd.DataFrame | np.ndarray,
    names: Sequence[Any] | None = None,
    *,
    label: str | None = None,
    value: str = "js",
    layers: Sequence[int] | None = None,
    measure: str = "Jensen-Shannon divergence (bits)",
    layer: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of a symmetric ``[groups, groups]`` divergence matrix between conditions.

    ``matrix``: a pairs frame (``layer, a, b, <value>`` as ``language_divergence`` returns; one heatmap per
    decoder layer behind a slider, one colour scale; ``names`` orders and selects its groups), a square DataFrame
    (index = columns = groups) or an array with ``names``. With ``label="lang"`` groups are shown as language
    names.
    """
    if isinstance(matrix, pd.DataFrame) and {"layer", "a", "b"} <= set(matrix.columns):
        require_columns(matrix, [value], "divergence_matrix_heatmap")
        shown_layers = frame_layers(matrix, layers if layer is None else [layer])
        present = sorted(set(matrix["a"].tolist()) | set(matrix["b"].tolist()), key=str)
        names = present if names is None else [n for n in names if n in set(present)]
        mats = [pair_matrix(matrix, la, value, names)[1] for la in shown_layers]
    else:
        if isinstance(matrix, pd.DataFrame):
            values = matrix.to_numpy(dtype=np.float64)
            names = list(matrix.index) if names is None else list(names)
        else:
            values = np.asarray(matrix, dtype=np.float64)
            names = list(range(values.shape[0])) if names is None else list(names)
        if values.ndim != 2 or values.shape[0] != values.shape[1] or len(names) != values.shape[0]:
            raise MetricError(
                "a divergence matrix must be square with one name per row (or a frame with columns layer, a, b); "
                f"got shape {values.shape}, {len(names)} names."
            )
        shown_layers: list[int | None] = [layer]  # type: ignore[no-redef]  # one matrix: no layer slider
        mats = [values]
    shown = label_names(names, label)
    zmax = max((float(np.nanmax(m)) for m in mats if np.isfinite(m).any()), default=1.0)
    fig = go.Figure()
    for j, (la, m) in enumerate(zip(shown_layers, mats, strict=True)):
        fig.add_trace(
            go.Heatmap(
                z=m, x=shown, y=shown, coloraxis="coloraxis", visible=j == 0,
                name=f"layer {la}" if la is not None else measure,
                hovertemplate="%{y} vs %{x}<br>" + measure + " %{z:.4f}<extra>"
                + (f"layer {la}" if la is not None else "") + "</extra>",
            )
        )  # fmt: skip
    # cells shrink with many groups so the matrix and its colour bar fit a 1000 px page; no fixed width: the
    # figure fills its container (square cells kept by scaleanchor)
    cell = float(np.clip(600 / max(len(shown), 1), 14, 34))
    side = int(max(420, cell * len(shown) + 200))
    single = len(shown_layers) == 1
    where = f" · decoder layer {shown_layers[0]}" if single and shown_layers[0] is not None else ""
    fig.update_layout(
        title=title or f"{measure.split(' (')[0]} between expert-usage distributions{where}",
        coloraxis={
            "colorscale": SEQUENTIAL,
            "cmin": 0.0,
            "cmax": zmax,
            "colorbar": {"title": {"text": measure, "side": "right"}},
        },
        xaxis={**category_axis(shown), "tickangle": -45 if len(shown) > 6 else 0, "scaleanchor": "y"},
        yaxis={**category_axis(shown), "autorange": "reversed"},
        sliders=[] if single else [layer_slider(shown_layers, pad={"t": 40 + (50 if len(shown) > 6 else 0)})],
        height=side + (0 if single else 90),
        margin={"r": 20},
    )
    return fig


#: at most this many lines get their own colour in ``divergence_over_depth``; beyond, the highest are highlighted
MAX_COLOURED = 10
MAX_HIGHLIGHT = 5


def divergence_over_depth(
    frame: pd.DataFrame,
    *,
    value: str = "divergence",
    color: str | None = None,
    label: str | None = None,
    floor: str | None = None,
    low: str | None = "ci_low",
    high: str | None = "ci_high",
    title: str | None = None,
    y: str | None = None,
    highlight: Sequence[Any] | int | None = None,
) -> go.Figure:
    """Lines of a divergence (or any per-layer value) over decoder layers, one per ``color`` group.

    Many groups do not fit one palette: with more than ``MAX_COLOURED`` groups (or ``highlight`` given: group
    values, or a number n = the n groups with the highest mean) only the highlighted lines get colours, a legend
    entry and a label at their end; the others are thin grey lines (hover names them).

    Roles as in every plot here: ``y`` (alias of ``value``) the column drawn, ``color`` the grouping,
    ``low``/``high`` the interval columns.

    ``label`` (defaults to ``color``) decides how group values are named (language names for ``lang``);
    ``floor`` names a column of a chance level (dashed, same colour); ``low``/``high`` name CI columns, drawn as
    error bars when present.
    """
    value = y or value
    require_columns(frame, ["layer", value, *[c for c in (color, floor) if c]], "divergence_over_depth")
    has_ci = bool(low and high and low in frame.columns and high in frame.columns)
    groups = [(None, frame)] if color is None else list(frame.groupby(color, sort=True))
    shown = label_names([g for g, _ in groups], label or color) if color else [value]
    palette = colorway()
    keys = [g for g, _ in groups]
    if isinstance(highlight, int) or (highlight is None and len(groups) > MAX_COLOURED):
        n_top = MAX_HIGHLIGHT if highlight is None else int(highlight)
        means = {g: float(np.nanmean(sub[value])) for g, sub in groups}
        hot = set(sorted(keys, key=lambda g: -means[g] if np.isfinite(means[g]) else np.inf)[:n_top])
    else:
        hot = set(keys) if highlight is None else {g for g in keys if g in set(highlight) or str(g) in
                                                  {str(h) for h in highlight}}
    rank = {g: i for i, g in enumerate([g for g in keys if g in hot])}
    fig = go.Figure()
    order = sorted(zip(groups, shown, strict=True), key=lambda item: item[0][0] in hot)  # grey lines first
    for (key, sub), name in order:
        sub = sub.sort_values("layer")
        if key not in hot:  # context: thin grey, no legend entry, drawn first
            fig.add_trace(go.Scatter(
                x=sub["layer"], y=sub[value], mode="lines", name=name, showlegend=False,
                line={"color": "#c8c8c8", "width": 1}, opacity=0.8,
                hovertemplate=f"decoder layer %{{x}}<br>{value} %{{y:.4f}}<extra>{name}</extra>"))
            continue
        c = palette[rank[key] % len(palette)]
        if len(hot) < len(keys) and len(sub):
            fig.add_annotation(x=sub["layer"].iloc[-1], y=sub[value].iloc[-1], text=name, showarrow=False,
                               xanchor="left", xshift=6, font={"color": c, "size": 12})
        err = None
        if has_ci:
            err = {"type": "data", "symmetric": False, "array": (sub[high] - sub[value]).clip(lower=0).to_numpy(),
                   "arrayminus": (sub[value] - sub[low]).clip(lower=0).to_numpy(), "thickness": 1, "width": 3}  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=sub["layer"], y=sub[value], mode="lines+markers", name=name, legendgroup=name,
                line={"color": c}, error_y=err,
                hovertemplate=f"decoder layer %{{x}}<br>{value} %{{y:.4f}}<extra>{name}</extra>",
            )
        )  # fmt: skip
        if floor:
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"], y=sub[floor], mode="lines", name=f"{name}: {floor}", legendgroup=name,
                    line={"color": c, "dash": "dash", "width": 1},
                    hovertemplate=f"decoder layer %{{x}}<br>{floor} %{{y:.4f}}<extra>{name}</extra>",
                )
            )  # fmt: skip
    layers = sorted(pd.unique(frame["layer"]).tolist())
    fig.update_layout(
        title=title or f"{value.replace('_', ' ').capitalize()} by layer",
        xaxis={"title": {"text": "decoder layer"}, "tickvals": layers if len(layers) <= 32 else None},
        yaxis={"title": {"text": value.replace("_", " ")}, "rangemode": "tozero"},
        height=420,
    )
    return fig


def differential_usage(
    frame: pd.DataFrame,
    *,
    value: str = "diff",
    low: str = "ci_low",
    high: str = "ci_high",
    layers: Sequence[int] | None = None,
    top_n: int = 20,
    names: tuple[str, str] | None = None,
    label: str | None = None,
    title: str | None = None,
    x: str | None = None,
) -> go.Figure:
    """Experts whose usage differs most between two conditions, with confidence-interval error bars.

    ``frame`` is a ``contrast`` frame: ``layer, expert, diff`` (share_a - share_b), ``ci_low, ci_high`` and,
    optionally, ``significant`` and the condition names ``a, b``. Per decoder layer the ``top_n`` experts by
    ``|diff|`` are horizontal bars (slider over layers): right = used more by a, left = more by b; bars whose
    CI includes 0 are faded. ``names`` overrides (a, b); ``label="lang"`` shows language names. Roles:
    ``x`` (alias of ``value``: the bars are horizontal) and ``low``/``high``.
    """
    value = x or value
    require_columns(frame, ["layer", "expert", value, low, high], "differential_usage")
    chosen = frame_layers(frame, layers)
    if names is None:
        if {"a", "b"} <= set(frame.columns) and len(frame):
            names = (frame["a"].iloc[0], frame["b"].iloc[0])
        else:
            names = ("a", "b")
    a, b = label_names(names, label)
    fig = go.Figure()
    pos_c, neg_c = "#e15759", "#4e79a7"
    vmax = 0.0
    for j, layer in enumerate(chosen):
        sub = frame[frame["layer"] == layer]
        sub = sub.reindex(sub[value].abs().sort_values(ascending=False).index).head(top_n).iloc[::-1]
        sig = (
            sub["significant"].to_numpy(bool)
            if "significant" in sub.columns
            else ((sub[low] > 0) | (sub[high] < 0)).to_numpy()
        )
        vmax = max(vmax, float(np.nanmax(np.abs(sub[[low, high, value]].to_numpy()))) if len(sub) else 0.0)
        fig.add_trace(
            go.Bar(
                x=sub[value],
                y=[f"e{int(e)}" for e in sub["expert"]],
                orientation="h",
                marker={
                    "color": [pos_c if v > 0 else neg_c for v in sub[value]],
                    "opacity": [1.0 if s else 0.35 for s in sig],
                },
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": (sub[high] - sub[value]).clip(lower=0).to_numpy(),
                    "arrayminus": (sub[value] - sub[low]).clip(lower=0).to_numpy(),
                    "thickness": 1.2,
                    "color": "#555",
                },
                customdata=np.stack([sub[low], sub[high]], axis=1),
                hovertemplate="expert %{y}<br>difference %{x:.4f}<br>CI [%{customdata[0]:.4f}, "
                "%{customdata[1]:.4f}]<extra>layer " + str(layer) + "</extra>",
                name=f"layer {layer}",
                showlegend=False,
                visible=j == 0,
            )
        )
    fig.add_vline(x=0, line={"color": "#888", "width": 1})
    fig.update_layout(
        title=title or f"Experts used more by {a} (right) or {b} (left); faded: CI includes 0",
        xaxis={"title": {"text": f"share of routing slots: {a} − {b}"}, "range": [-vmax * 1.05, vmax * 1.05]},
        yaxis={"title": {"text": "expert"}},
        sliders=[layer_slider(chosen)] if len(chosen) > 1 else [],
        height=int(max(380, 22 * min(top_n, frame["expert"].nunique()) + 220)),
    )
    return fig


def usage_difference_heatmap(
    frame: pd.DataFrame, *, value: str = "diff", title: str | None = None
) -> go.Figure:
    """All layers at once: ``[layers, experts]`` heatmap of a usage difference on a diverging scale at 0."""
    require_columns(frame, ["layer", "expert", value], "usage_difference_heatmap")
    mat = frame.pivot_table(index="layer", columns="expert", values=value, aggfunc="mean").sort_index()
    layers = [int(x) for x in mat.index]
    lim = float(np.nanmax(np.abs(mat.to_numpy()))) if mat.size else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=mat.to_numpy(),
            x=list(mat.columns),
            y=[str(x) for x in layers],
            colorscale=DIVERGING,
            zmid=0,
            zmin=-lim,
            zmax=lim,
            colorbar={"title": {"text": value}},
            hovertemplate="decoder layer %{y} · expert %{x}<br>" + value + " %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or "Usage difference by layer and expert",
        xaxis={"title": {"text": "expert"}},
        yaxis={"title": {"text": "decoder layer"}, "autorange": "reversed", **category_axis(layers)},
        height=int(max(320, 26 * len(layers) + 170)),
    )
    return fig
