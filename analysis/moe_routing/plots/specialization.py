"""Specialisation: which experts a label (language, domain, phase, ...) uses, how much routing tells about the
label (NMI), which experts fire together, and how top-1 choices flow from layer to layer.

``label_nmi`` frames have columns ``layer, nmi, floor`` (and optionally ``label``); ``coactivation`` is an
``[experts, experts]`` array of one layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .. import metrics as M
from ..errors import MetricError, PlotError, PlotInputError, TraceError
from ..trace import RoutingTrace
from ._common import (
    category_axis,
    frame_layers,
    is_trace_source,
    label_names,
    layer_positions,
    layer_slider,
    metric_frame,
    require_columns,
)
from .theme import EMPTY_COLOR, SEQUENTIAL, colorway, expert_color

Normalize = Literal["label", "lift", "count"]

#: lifts above this share the darkest red in ``label_usage_heatmap`` (hover shows the exact value)
LIFT_CAP = 4.0


def _usage_frame(data: Any, label: str, top1: bool) -> pd.DataFrame:
    """A ``label_usage`` frame: ``<label>, layer, expert, count, share, lift`` (computed from a trace if needed)."""
    if isinstance(data, RoutingTrace):
        data.label(label)  # the trace's clear error for an unknown label
    frame = metric_frame(data, M.label_usage, label=label, top1=top1)
    require_columns(frame, [label, "layer", "expert", "count", "share"], "label_usage_heatmap")
    return frame


def usage_matrices(
    frame: pd.DataFrame,
    label: str,
    layers: Sequence[int],
    normalize: Normalize,
    values: Sequence[Any] | None = None,
) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """Label values, ``[layers, values, experts]`` matrices of ``normalize`` and ``[layers, values, experts]``
    counts from a ``label_usage`` frame (missing rows count 0)."""
    present = sorted(pd.unique(frame[label]).tolist(), key=str)
    if values is not None:
        where = {str(v): v for v in present}
        missing = [v for v in values if str(v) not in where]
        if missing:
            raise TraceError(f"label {label!r} has no values {missing}; it has {[str(v) for v in present]}.")
        present = [where[str(v)] for v in values]
    n_exp = int(frame["expert"].max()) + 1
    column = {"label": "share", "lift": "lift", "count": "count"}.get(normalize)
    if column is None:
        raise PlotError(f"normalize must be 'label', 'lift' or 'count', got {normalize!r}.")
    if column == "lift" and "lift" not in frame.columns:
        overall = frame.groupby(["layer", "expert"])["count"].transform("sum")
        total = frame.groupby("layer")["count"].transform("sum")
        frame = frame.assign(lift=frame["share"] / (overall / total))
    out = np.full((len(layers), len(present), n_exp), np.nan)
    counts = np.zeros((len(layers), len(present), n_exp), dtype=np.int64)
    rows = {str(v): i for i, v in enumerate(present)}
    lidx = {int(x): j for j, x in enumerate(layers)}
    sub = frame[frame["layer"].isin(list(lidx)) & frame[label].astype(str).isin(list(rows))]
    j = sub["layer"].map(lidx).to_numpy()
    i = sub[label].astype(str).map(rows).to_numpy()
    e = sub["expert"].to_numpy().astype(int)
    out[j, i, e] = sub[column].to_numpy(dtype=np.float64)
    counts[j, i, e] = sub["count"].to_numpy()
    if column == "count":
        out = np.nan_to_num(out)
    return present, out, counts


def _lift_colour_axis(zmax: float, what: str) -> tuple[dict[str, Any], float]:
    """Colour axis of log2(lift), symmetric around lift 1 (white), blue below and red above, saturating at
    ``LIFT_CAP`` and 1 / ``LIFT_CAP``; ticks labelled as lifts. Returns (coloraxis, the saturation lift)."""
    top = min(max(2.0, zmax), LIFT_CAP)
    span = float(np.log2(top))
    ticks = [t for t in (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0) if abs(np.log2(t)) <= span + 1e-9]
    labels = {1 / 8: "⅛", 1 / 4: "¼", 1 / 2: "½"}
    title = f"{what} (log scale" + (f"; ≥ {top:g} and ≤ 1/{top:g} saturated)" if zmax > top else ")")
    axis = {
        "colorscale": [[0.0, "#2166ac"], [0.25, "#92c5de"], [0.5, "#f7f7f7"], [0.75, "#f4a582"], [1.0, "#b2182b"]],
        "cmin": -span, "cmax": span, "cmid": 0.0,
        "colorbar": {"title": {"text": title, "side": "right"}, "tickvals": [float(np.log2(t)) for t in ticks],
                     "ticktext": [labels.get(t, f"{t:g}") for t in ticks]},
    }
    return axis, top


def label_usage_heatmap(
    data: RoutingTrace | pd.DataFrame | Any,
    label: str,
    *,
    layers: Sequence[int] | None = None,
    normalize: Normalize = "label",
    top1: bool = False,
    values: Sequence[Any] | None = None,
    title: str | None = None,
    min_count: int | None = None,
) -> go.Figure:
    """Expert usage by label value: label values (rows) x experts (columns), one heatmap per decoder layer
    behind a layer slider, all on one colour scale.

    ``data``: a trace (or trace directory) or a ``label_usage(trace, label)`` frame. ``normalize``: ``"label"``
    = share of the value's routed slots per expert (rows sum to 1, Mixtral Fig. 7); ``"lift"`` = that share
    over the expert's overall share (1 = no preference), drawn on a log colour scale centred at 1 (white; a lift
    of 2 as red as ½ is blue); ``"count"`` = slots. ``values`` picks and orders label values. Language labels
    (``lang``) are shown by name. Cells resting on too few observations are left blank: those a ``too_few``
    column marks, and with ``min_count`` those whose observed and expected (no-preference) slots are both
    below it (a lift of 2.6 from 3 slots is not a strong preference).
    """
    frame = _usage_frame(data, label, top1)
    if "too_few" in frame.columns and normalize != "count":
        frame = frame.assign(**{"lift" if normalize == "lift" else "share": frame[
            "lift" if normalize == "lift" else "share"].where(~frame["too_few"].astype(bool))})
    shown_layers = frame_layers(frame, layers)
    vals, mats, counts = usage_matrices(frame, label, shown_layers, normalize, values)
    names = label_names(vals, label)
    n_exp = mats.shape[2]
    masked = 0
    if min_count is not None and normalize != "count":
        totals = counts.sum(axis=2, keepdims=True)  # [layers, values, 1]
        overall = counts.sum(axis=1, keepdims=True) / np.maximum(counts.sum(axis=(1, 2), keepdims=True), 1)
        expected = totals * overall  # slots under label-independent routing
        few = (counts < min_count) & (expected < min_count)
        masked = int((few & np.isfinite(mats)).sum())
        mats = np.where(few, np.nan, mats)
    finite = mats[np.isfinite(mats)]
    zmax = float(finite.max()) if finite.size else 1.0
    what = {"label": "share of slots", "lift": "lift over overall share", "count": "slots"}[normalize]
    fmt = {"label": ".1%", "lift": ".2f", "count": ",.0f"}[normalize]
    coloraxis: dict[str, Any]
    if normalize == "lift":
        coloraxis, top = _lift_colour_axis(zmax, what)
        with np.errstate(divide="ignore"):
            z = np.clip(np.log2(mats), -np.log2(top), np.log2(top))  # lift 0 -> the bluest colour
    else:
        coloraxis = {"colorbar": {"title": {"text": what, "side": "right"}}, "colorscale": SEQUENTIAL,
                     "cmin": 0.0, "cmax": zmax}
        z = mats
    fig = go.Figure()
    for j, layer in enumerate(shown_layers):
        fig.add_trace(
            go.Heatmap(
                z=z[j],
                x=np.arange(n_exp),
                y=names,
                customdata=np.stack([counts[j], mats[j]], axis=-1),
                coloraxis="coloraxis",
                name=f"layer {layer}",
                hovertemplate=f"{label} = %{{y}} · expert %{{x}}<br>{what}: %{{customdata[1]:{fmt}}}"
                f"<br>slots: %{{customdata[0]:,}}<extra>layer {layer}</extra>",
                hoverongaps=False,
                visible=j == 0,
            )
        )
    blank = int(np.isnan(mats).sum())
    if masked:
        note = f" · grey: fewer than {min_count} slots observed and expected"
    elif blank and normalize != "count":
        note = " · grey: no estimate (too few slots, or an expert never chosen)"
    else:
        note = ""
    fig.update_layout(
        title=(title or f"Expert usage by {label}" + (" (first choice)" if top1 else "")) + note,
        coloraxis=coloraxis,
        xaxis={"title": {"text": "expert"}, "dtick": 1 if n_exp <= 32 else None, "showgrid": False},
        yaxis={"title": {"text": label}, "autorange": "reversed", "showgrid": False, **category_axis(names)},
        plot_bgcolor="#d0d0d0" if blank else None,  # masked cells grey, apart from the white of lift 1
        sliders=[layer_slider(shown_layers)],
        height=int(max(360, 24 * len(names) + 230)),
    )
    return fig


def label_usage_heatmap_static(
    data: RoutingTrace | pd.DataFrame | Any,
    label: str,
    layer: int,
    *,
    normalize: Normalize = "label",
    top1: bool = False,
    ax: Any = None,
) -> Any:
    """Static (seaborn) heatmap of expert usage by label at one decoder layer; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = _usage_frame(data, label, top1)
    shown = frame_layers(frame, [layer])
    vals, mats, _ = usage_matrices(frame, label, shown, normalize)
    table = pd.DataFrame(mats[0], index=label_names(vals, label))
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(16, 2.5 + 0.32 * table.shape[1]), 1.5 + 0.35 * len(vals)))
    else:
        fig = ax.figure
    sns.heatmap(
        table,
        ax=ax,
        cmap="RdBu_r" if normalize == "lift" else "viridis",
        center=1.0 if normalize == "lift" else None,
        cbar_kws={"label": {"label": "share of slots", "lift": "lift", "count": "slots"}[normalize]},
    )
    ax.set_xlabel("expert")
    ax.set_ylabel(label)
    ax.set_title(f"Expert usage by {label} · decoder layer {layer}")
    return fig


def nmi_by_layer(
    nmi: pd.DataFrame | Any,
    label: str | Sequence[str] | None = None,
    *,
    color: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Normalised mutual information between a label and the expert choice, by decoder layer.

    ``nmi``: a ``label_nmi`` frame (``layer, nmi, floor``; floor = NMI of shuffled labels, dashed in the same
    colour), or a trace with ``label`` (one name or several, each computed with ``label_nmi``). A ``label``
    column (several labels in one frame) is used as ``color`` automatically.
    """
    if not isinstance(nmi, pd.DataFrame):
        if label is None:
            raise PlotInputError("nmi_by_layer(trace, label): name the label(s) to compute label_nmi for.")
        names = [label] if isinstance(label, str) else list(label)
        nmi = pd.concat(
            [metric_frame(nmi, M.label_nmi, label=n).assign(label=n) for n in names], ignore_index=True
        )
    require_columns(nmi, ["layer", "nmi", "floor"], "nmi_by_layer")
    if color is None and "label" in nmi.columns and nmi["label"].nunique() > 1:
        color = "label"
    groups = [(None, nmi)] if color is None else list(nmi.groupby(color, sort=False))
    palette = colorway()
    fig = go.Figure()
    for g, (name, sub) in enumerate(groups):
        sub = sub.sort_values("layer")
        c = palette[g % len(palette)]
        tag = "NMI" if name is None else str(name)
        fig.add_trace(
            go.Scatter(
                x=sub["layer"],
                y=sub["nmi"],
                mode="lines+markers",
                name=tag,
                line={"color": c},
                legendgroup=tag,
                hovertemplate=f"decoder layer %{{x}}<br>NMI %{{y:.4f}}<extra>{tag}</extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=sub["layer"],
                y=sub["floor"],
                mode="lines",
                name=f"{tag}: floor" if name is not None else "floor",
                line={"color": c, "dash": "dash", "width": 1},
                legendgroup=tag,
                hovertemplate=f"decoder layer %{{x}}<br>floor %{{y:.4f}}<extra>{tag}</extra>",
            )
        )
    layers = sorted(pd.unique(nmi["layer"]).tolist())
    fig.update_layout(
        title=title or "How much the expert choice tells about the label (NMI); dashed: shuffled-label floor",
        xaxis={"title": {"text": "decoder layer"}, "tickvals": layers if len(layers) <= 32 else None},
        yaxis={"title": {"text": "normalised mutual information"}, "rangemode": "tozero"},
        height=420,
    )
    return fig


def nmi_by_layer_static(nmi: pd.DataFrame, *, ax: Any = None) -> Any:
    """Static (seaborn) version of :func:`nmi_by_layer`; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    require_columns(nmi, ["layer", "nmi", "floor"], "nmi_by_layer_static")
    fig, ax = plt.subplots(figsize=(7, 4)) if ax is None else (ax.figure, ax)
    hue = "label" if "label" in nmi.columns else None
    sns.lineplot(data=nmi, x="layer", y="nmi", hue=hue, marker="o", ax=ax)
    sns.lineplot(data=nmi, x="layer", y="floor", hue=hue, ax=ax, linestyle="--", legend=False)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("NMI (dashed: floor)")
    ax.set_ylim(bottom=0)
    return fig


def _cluster_order(mat: np.ndarray) -> np.ndarray:
    """Leaf order of an average-linkage clustering of the rows of ``mat`` ``[E, E]``."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    x = np.nan_to_num(mat.astype(np.float64))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return leaves_list(linkage(x, method="average", metric="euclidean"))


def coactivation_heatmap(
    matrix: np.ndarray | RoutingTrace,
    layer: int | None = None,
    *,
    order: Literal["id", "cluster"] = "id",
    hide_diagonal: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of how often two experts are chosen for the same token, ``[experts, experts]``.

    Pass the ``coactivation(trace, layer)`` array (row i, column j: P(expert j chosen | expert i chosen)), or a
    trace and ``layer`` to compute it. ``order="cluster"``
    reorders experts so that groups that fire together sit side by side (tick labels keep the expert ids).
    """
    if is_trace_source(matrix):
        if layer is None:
            layers = f"; MoE layers are {list(matrix.layers)}" if hasattr(matrix, "layers") else ""
            raise TraceError(f"pass layer= (a decoder-layer index{layers}).")
        if isinstance(matrix, RoutingTrace):
            matrix.layer_index(layer)
        mat = np.asarray(metric_frame(matrix, M.coactivation, layer=layer), dtype=np.float64)
    else:
        mat = np.asarray(matrix, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise MetricError(f"coactivation must be a square [experts, experts] array, got shape {mat.shape}.")
    if hide_diagonal:
        mat = mat.copy()
        np.fill_diagonal(mat, np.nan)
    idx = _cluster_order(mat) if order == "cluster" else np.arange(mat.shape[0])
    ids = [str(i) for i in idx]
    fig = go.Figure(
        go.Heatmap(
            z=mat[np.ix_(idx, idx)],
            x=ids,
            y=ids,
            colorscale=SEQUENTIAL,
            colorbar={"title": {"text": "P(col | row)"}},
            hovertemplate="P(expert %{x} | expert %{y}) = %{z:.3f}<extra></extra>",
        )
    )
    where = f" · decoder layer {layer}" if layer is not None else ""
    fig.update_layout(
        title=title or f"Expert co-activation{where}" + (" (clustered order)" if order == "cluster" else ""),
        xaxis={"title": {"text": "expert"}, **category_axis(ids), "scaleanchor": "y"},
        yaxis={"title": {"text": "expert"}, **category_axis(ids), "autorange": "reversed"},
        width=620,
        height=580,
    )
    return fig


def top1_sankey(
    trace: RoutingTrace,
    layers: Sequence[int] | None = None,
    *,
    top_n: int = 6,
    title: str | None = None,
) -> go.Figure:
    """Sankey diagram of how tokens' first-choice experts flow from each MoE layer to the next.

    Per layer the ``top_n`` most used experts get a node; the rest (and empty slots) share an "other" node.
    Node ``k`` of layer ``j`` is labelled ``"L<decoder layer> e<expert>"``.
    """
    lpos = layer_positions(trace, layers)
    if len(lpos) < 2:
        raise TraceError("a Sankey of layer-to-layer flow needs at least two MoE layers.")
    if top_n < 1:
        raise PlotError(f"top_n must be at least 1, got {top_n}.")
    top1 = trace.top1()[:, lpos].astype(np.int64)
    labels: list[str] = []
    colors: list[str] = []
    node_of: list[np.ndarray] = []
    for j, li in enumerate(lpos):
        counts = np.bincount(top1[:, j][top1[:, j] >= 0], minlength=trace.num_experts)
        keep = [int(e) for e in np.argsort(-counts, kind="stable")[:top_n] if counts[e] > 0]
        keep.sort()
        mapping = np.full(trace.num_experts + 1, -1, dtype=np.int64)  # index E holds the empty slot (-1)
        base = len(labels)
        for k, e in enumerate(keep):
            mapping[e] = base + k
            labels.append(f"L{trace.layers[li]} e{e}")
            colors.append(expert_color(e, trace.num_experts))
        other = base + len(keep)
        if np.any(mapping[top1[:, j]] < 0):
            labels.append(f"L{trace.layers[li]} other")
            colors.append(EMPTY_COLOR)
        mapping[mapping < 0] = other
        node_of.append(mapping[top1[:, j]])
    src, dst, val, link_colors = [], [], [], []
    for j in range(len(lpos) - 1):
        pairs, n = np.unique(np.stack([node_of[j], node_of[j + 1]], axis=1), axis=0, return_counts=True)
        for (a, b), c in zip(pairs.tolist(), n.tolist(), strict=True):
            src.append(a)
            dst.append(b)
            val.append(c)
            h = colors[a].lstrip("#")
            link_colors.append(f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},0.35)")
    fig = go.Figure(
        go.Sankey(
            arrangement="snap",
            node={"label": labels, "color": colors, "pad": 8, "thickness": 14},
            link={"source": src, "target": dst, "value": val, "color": link_colors},
            valueformat=",d",
            valuesuffix=" tokens",
        )
    )
    fig.update_layout(
        title=title or f"Flow of first-choice experts across layers (top {top_n} per layer, rest = other)",
        height=max(420, 60 * (top_n + 1) + 160),
        width=max(700, 170 * len(lpos)),
    )
    return fig


__all__ = [
    "coactivation_heatmap",
    "label_usage_heatmap",
    "label_usage_heatmap_static",
    "nmi_by_layer",
    "nmi_by_layer_static",
    "top1_sankey",
    "usage_matrices",
]
