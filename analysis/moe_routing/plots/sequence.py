"""Sequence effects: do consecutive tokens keep their expert (Mixtral paper Fig. 10), and does the expert
choice depend on the position in the sequence.

``consecutive_same_expert(trace)`` frames have columns ``layer, first, first_or_second, random_first``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import metrics as M
from ..trace import RoutingTrace
from ._common import category_axis, frame_layers, metric_frame, require_columns
from .theme import SEQUENTIAL, colorway

_MEASURES = {
    "first": ("first choice repeated", "random_first"),
    "first_or_second": ("first or second choice shared", "random_first_or_second"),
}


def _ci(df: pd.DataFrame, col: str) -> dict[str, Any] | None:
    lo, hi = f"{col}_low", f"{col}_high"
    if lo not in df.columns or hi not in df.columns:
        return None
    return {"type": "data", "symmetric": False, "array": (df[hi] - df[col]).to_numpy(),
            "arrayminus": (df[col] - df[lo]).to_numpy(), "thickness": 1.2, "width": 3}  # fmt: skip


def consecutive_same_expert_plot(
    frame: Any,
    *,
    group: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """How often consecutive tokens share an expert, by decoder layer, against a random router (dashed).

    ``frame``: a ``consecutive_same_expert`` frame (``layer, first, first_or_second, random_first`` and, when
    present, ``random_first_or_second`` and ``*_low/*_high`` CIs drawn as error bars) or a trace. Without
    ``group``: grouped bars per layer; with ``group`` (the frame's ``by`` label column, e.g. ``domain``): one
    panel per measure and one line per group, as in Fig. 10 of the Mixtral paper.
    """
    df = metric_frame(frame, M.consecutive_same_expert, **({"by": group} if group else {}))
    need = ["layer", "first", "first_or_second", "random_first", *([group] if group else [])]
    require_columns(df, need, "consecutive_same_expert_plot")
    palette = colorway()
    layers = sorted(int(x) for x in pd.unique(df["layer"]))
    if group is None:
        df = df.sort_values("layer")
        x = df["layer"].astype(str)
        fig = go.Figure()
        for i, (col, (name, rnd)) in enumerate(_MEASURES.items()):
            if df[col].isna().all():
                continue  # first_or_second is NaN for top-1 models
            fig.add_trace(
                go.Bar(
                    x=x, y=df[col], name=name, marker={"color": palette[i]}, error_y=_ci(df, col),
                    hovertemplate=f"decoder layer %{{x}}<br>{name}: %{{y:.1%}}<extra></extra>",
                )
            )  # fmt: skip
            if rnd in df.columns:
                fig.add_trace(
                    go.Scatter(
                        x=x, y=df[rnd], mode="lines", name=f"random router: {name}",
                        line={"dash": "dash", "color": palette[i], "width": 1.5},
                        hovertemplate=f"decoder layer %{{x}}<br>random router: %{{y:.1%}}<extra>{name}</extra>",
                    )
                )  # fmt: skip
        fig.update_layout(barmode="group", xaxis={"title": {"text": "decoder layer"}, "type": "category"})
    else:
        fig = make_subplots(
            rows=1, cols=2, subplot_titles=[v[0] for v in _MEASURES.values()], shared_yaxes=True
        )
        for g, (name, sub) in enumerate(df.groupby(group, sort=True)):
            sub = sub.sort_values("layer")
            for c, col in enumerate(_MEASURES, start=1):
                fig.add_trace(
                    go.Scatter(
                        x=sub["layer"], y=sub[col], mode="lines+markers", name=str(name), legendgroup=str(name),
                        showlegend=c == 1, line={"color": palette[g % len(palette)]},
                        hovertemplate=f"decoder layer %{{x}}<br>%{{y:.1%}}<extra>{name}</extra>",
                    ),
                    row=1, col=c,
                )  # fmt: skip
        for c, (_, rnd) in enumerate(_MEASURES.values(), start=1):
            if rnd not in df.columns:
                continue
            base = df.groupby("layer")[rnd].mean().sort_index()
            fig.add_trace(
                go.Scatter(x=base.index, y=base.values, mode="lines", name="random router", showlegend=c == 1,
                           line={"dash": "dash", "color": "#555"}),
                row=1, col=c,
            )  # fmt: skip
        for c in (1, 2):
            fig.update_xaxes(
                title_text="decoder layer", tickvals=layers if len(layers) <= 32 else None, row=1, col=c
            )
    fig.update_layout(
        title=title or "Consecutive tokens routed to the same expert (dashed: random router)",
        yaxis={
            "title": {"text": "share of consecutive token pairs"},
            "tickformat": ".0%",
            "rangemode": "tozero",
        },
        height=420,
    )
    return fig


def expert_by_position(
    data: Any,
    layer: int,
    *,
    bins: int | Sequence[int] | None = None,
    top1: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Share of each expert by position in the sequence at one layer: position buckets (rows) x experts.

    ``data``: a trace or a ``load_by_position`` frame (``layer, pos_start, pos_end, expert, count, share``);
    ``bins`` as in ``load_by_position`` (None = powers of two). Reveals experts that specialise in the first
    tokens of a sequence.
    """
    if isinstance(data, RoutingTrace):
        data.layer_index(layer)
    df = metric_frame(data, M.load_by_position, bins=bins, top1=top1)
    require_columns(df, ["layer", "pos_start", "pos_end", "expert", "count", "share"], "expert_by_position")
    frame_layers(df, [layer])
    sub = df[df["layer"] == layer]
    n_exp = int(df["expert"].max()) + 1
    buckets = sub[["pos_start", "pos_end"]].drop_duplicates().sort_values("pos_start")
    names = [
        f"{a}+" if b < 0 else (f"{a}" if b - a == 1 else f"{a}–{b - 1}")
        for a, b in zip(buckets["pos_start"], buckets["pos_end"], strict=True)
    ]
    row_of = {int(a): i for i, a in enumerate(buckets["pos_start"])}
    share = np.full((len(names), n_exp), np.nan)
    counts = np.zeros((len(names), n_exp))
    r = sub["pos_start"].map(row_of).to_numpy()
    e = sub["expert"].to_numpy().astype(int)
    share[r, e] = sub["share"].to_numpy()
    counts[r, e] = sub["count"].to_numpy()
    fig = go.Figure(
        go.Heatmap(
            z=share, x=np.arange(n_exp), y=names, customdata=counts, colorscale=SEQUENTIAL, zmin=0,
            zmax=float(np.nanmax(share)) if np.isfinite(share).any() else 1.0,
            colorbar={"title": {"text": "share"}},
            hovertemplate="positions %{y} · expert %{x}<br>share %{z:.1%} (%{customdata:,.0f} slots)<extra></extra>",
        )
    )  # fmt: skip
    fig.update_layout(
        title=title
        or f"{'First-choice expert' if top1 else 'Expert use'} by position · decoder layer {layer}",
        xaxis={"title": {"text": "expert"}},
        yaxis={"title": {"text": "position in sequence"}, **category_axis(names), "autorange": "reversed"},
        height=int(max(360, 24 * len(names) + 170)),
    )
    return fig
