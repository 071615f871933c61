"""Expert load: who gets how many tokens, how balanced each layer is, and what capacity limits would drop.

Inputs are the tidy frames of ``moe_routing.metrics`` (or a trace, from which the frame is computed):
``expert_load`` -> ``layer, expert, count, share``; ``load_balance`` -> ``layer, cv, max_over_mean,
entropy_norm, gini``. Layers are always decoder-layer indices.
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
from ._common import category_axis, metric_frame, require_columns
from .theme import SEQUENTIAL, colorway

#: what a perfectly balanced layer scores on each load-balance metric, and a readable name
BALANCE_METRICS: dict[str, tuple[str, float]] = {
    "cv": ("coefficient of variation", 0.0),
    "max_over_mean": ("max load / mean load", 1.0),
    "entropy_norm": ("normalised entropy", 1.0),
    "gini": ("Gini coefficient", 0.0),
}


def load_matrix(load: pd.DataFrame, value: str = "share") -> pd.DataFrame:
    """``[layers, experts]`` pivot of an ``expert_load`` frame (missing experts count 0), layers in order."""
    require_columns(load, ["layer", "expert", value], "load_matrix")
    mat = load.pivot_table(index="layer", columns="expert", values=value, aggfunc="sum", fill_value=0)
    experts = np.arange(int(load["expert"].max()) + 1)
    return mat.reindex(columns=experts, fill_value=0).sort_index()


def expert_load_heatmap(
    load: RoutingTrace | pd.DataFrame,
    *,
    relative: bool = False,
    zmax: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of expert load, decoder layers (rows) x experts (columns).

    ``relative=False`` shows each expert's share of the layer's routed slots; ``relative=True`` shows
    share x experts (1 = exactly its fair share) on a diverging scale from 0 (blue) through 1 (white) to
    ``zmax`` (red; default the largest value, at least 2). Pass the same ``zmax`` to compare two figures.
    """
    frame = metric_frame(load, M.expert_load)
    share = load_matrix(frame, "share")
    counts = load_matrix(frame, "count") if "count" in frame.columns else share * np.nan
    n_exp = share.shape[1]
    z = share.to_numpy() * n_exp if relative else share.to_numpy()
    layers = [int(x) for x in share.index]
    top = float(np.nanmax(z)) if zmax is None else float(zmax)
    if relative:  # loads are >= 0: white at 1 on a 0..top scale (a symmetric zmid scale would reach below 0)
        top = max(top, 2.0)
        w = 1.0 / top
        scale: Any = [[0.0, "#2166ac"], [w / 2, "#92c5de"], [w, "#f7f7f7"], [w + (1 - w) / 3, "#f4a582"],
                      [w + 2 * (1 - w) / 3, "#d6604d"], [1.0, "#b2182b"]]  # fmt: skip
    heat = go.Heatmap(
        z=z,
        x=list(share.columns),
        y=[str(x) for x in layers],
        customdata=np.dstack([share.to_numpy(), counts.to_numpy()]),
        colorscale=scale if relative else SEQUENTIAL,
        zmin=0.0,
        zmax=top,
        colorbar={"title": {"text": "load / fair share" if relative else "share"}},
        hovertemplate="decoder layer %{y} · expert %{x}<br>share %{customdata[0]:.2%}"
        "<br>count %{customdata[1]:,.0f}<extra></extra>",
    )
    fig = go.Figure(heat)
    fig.update_layout(
        title=title
        or (
            "Expert load relative to a uniform router" if relative else "Expert load (share of routed slots)"
        ),
        xaxis={"title": {"text": "expert"}, "dtick": 1 if n_exp <= 32 else None},
        yaxis={"title": {"text": "decoder layer"}, "autorange": "reversed", **category_axis(layers)},
        height=int(max(320, 26 * len(layers) + 170)),
    )
    return fig


def load_balance_lines(
    balance: RoutingTrace | pd.DataFrame,
    *,
    metrics: Sequence[str] = ("cv", "max_over_mean", "entropy_norm", "gini"),
    color: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Load-balance metrics by decoder layer, one small panel per metric, with the balanced value dotted.

    ``color`` names a column (e.g. ``model`` or ``condition``) drawn as separate lines.
    """
    frame = metric_frame(balance, M.load_balance)
    require_columns(frame, ["layer", *metrics, *([color] if color else [])], "load_balance_lines")
    fig = make_subplots(
        rows=1,
        cols=len(metrics),
        subplot_titles=[BALANCE_METRICS.get(m, (m, None))[0] for m in metrics],
        horizontal_spacing=0.06,
    )
    groups = [(None, frame)] if color is None else list(frame.groupby(color, sort=False))
    palette = colorway()
    for g, (name, sub) in enumerate(groups):
        sub = sub.sort_values("layer")
        for c, m in enumerate(metrics, start=1):
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"],
                    y=sub[m],
                    mode="lines+markers",
                    name=str(name) if name is not None else m,
                    legendgroup=str(name),
                    showlegend=name is not None and c == 1,
                    line={"color": palette[g % len(palette)]},
                    hovertemplate=f"decoder layer %{{x}}<br>{m} = %{{y:.3f}}<extra>{name if name is not None else ''}</extra>",
                ),
                row=1,
                col=c,
            )
    if "cv" in metrics and "cv_random" in frame.columns:
        rnd = frame.groupby("layer")["cv_random"].mean().sort_index()
        fig.add_trace(
            go.Scatter(
                x=rnd.index, y=rnd.values, mode="lines", name="random routing", showlegend=True,
                line={"dash": "dash", "color": "#888", "width": 1},
                hovertemplate="decoder layer %{x}<br>cv of random routing %{y:.3f}<extra></extra>",
            ),
            row=1, col=list(metrics).index("cv") + 1,
        )  # fmt: skip
    layers = sorted(pd.unique(frame["layer"]).tolist())
    for c, m in enumerate(metrics, start=1):
        ref = BALANCE_METRICS.get(m, (m, None))[1]
        if ref is not None:
            fig.add_hline(y=ref, line={"dash": "dot", "width": 1, "color": "#888"}, row=1, col=c)
        fig.update_xaxes(
            title_text="decoder layer", tickvals=layers if len(layers) <= 24 else None, row=1, col=c
        )
    fig.update_layout(
        title=title or "Load balance by layer (dotted: perfectly balanced; dashed: random routing)",
        height=380,
        width=max(700, 300 * len(metrics)),
        legend={"orientation": "h", "y": -0.25, "x": 0},
    )
    return fig


def load_distribution(
    load: RoutingTrace | pd.DataFrame,
    *,
    relative: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Per decoder layer, the distribution of expert loads (box with every expert as a point).

    ``relative=True`` plots share x experts (1 = fair share); hover names the expert.
    """
    frame = metric_frame(load, M.expert_load)
    share = load_matrix(frame, "share")
    n_exp = share.shape[1]
    long = share.stack().rename("share").reset_index()
    y = long["share"] * n_exp if relative else long["share"]
    layers = [int(x) for x in share.index]
    fig = go.Figure(
        go.Box(
            x=long["layer"].astype(str),
            y=y,
            boxpoints="all",
            jitter=0.45,
            pointpos=0,
            marker={"size": 4, "opacity": 0.7},
            line={"width": 1.2},
            customdata=long["expert"],
            hovertemplate="decoder layer %{x} · expert %{customdata}<br>"
            + ("load / fair share %{y:.2f}" if relative else "share %{y:.2%}")
            + "<extra></extra>",
            name="experts",
            showlegend=False,
        )
    )
    if relative:
        fig.add_hline(y=1.0, line={"dash": "dot", "color": "#888"}, annotation_text="fair share")
    fig.update_layout(
        title=title or "Distribution of expert load per layer",
        xaxis={"title": {"text": "decoder layer"}, **category_axis(layers)},
        yaxis={"title": {"text": "load / fair share" if relative else "share of routed slots"}},
        height=420,
    )
    return fig


def capacity_drop_curves(
    frame: Any,
    *,
    y: str = "drop_rate",
    capacity_factors: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
    title: str | None = None,
) -> go.Figure:
    """Share of routed slots an expert capacity limit would drop, against the capacity factor, per layer.

    ``frame``: a ``capacity_drop`` frame (``capacity_factor, layer, drop_rate, drop_rate_random``; ``y`` may
    be ``token_drop_rate``) or a trace (simulated at ``capacity_factors``). One curve per decoder layer
    (darker = deeper); dashed grey: the same simulation on uniformly random routing (mean over layers).
    Frames split by position are summed over positions first.
    """
    df = metric_frame(frame, M.capacity_drop, capacity_factors=capacity_factors)
    require_columns(df, ["capacity_factor", "layer", y], "capacity_drop_curves")
    random_col = {"drop_rate": "drop_rate_random"}.get(y)
    if "pos_start" in df.columns:  # by_position=True: back to one row per (factor, layer)
        w = df["slots"] if "slots" in df.columns else pd.Series(1.0, index=df.index)
        cols = [c for c in (y, random_col) if c and c in df.columns]
        df = (
            df.assign(**{c: df[c] * w for c in cols}, _w=w)
            .groupby(["capacity_factor", "layer"], as_index=False)[[*cols, "_w"]]
            .sum()
        )
        for c in cols:
            df[c] = df[c] / df["_w"]
    from plotly.colors import sample_colorscale

    layers = sorted(int(x) for x in pd.unique(df["layer"]))
    fig = go.Figure()
    for g, layer in enumerate(layers):
        sub = df[df["layer"] == layer].sort_values("capacity_factor")
        shade = sample_colorscale("Viridis", [0.9 * g / max(len(layers) - 1, 1)])[0]
        fig.add_trace(
            go.Scatter(
                x=sub["capacity_factor"], y=sub[y], mode="lines+markers", name=f"layer {layer}",
                line={"color": shade},
                hovertemplate=f"decoder layer {layer}<br>capacity factor %{{x:.2f}}<br>{y} %{{y:.2%}}<extra></extra>",
            )
        )  # fmt: skip
    if random_col and random_col in df.columns:
        rnd = df.groupby("capacity_factor")[random_col].mean().sort_index()
        fig.add_trace(
            go.Scatter(
                x=rnd.index, y=rnd.values, mode="lines", name="random routing",
                line={"dash": "dash", "color": "#888"},
                hovertemplate="random routing<br>capacity factor %{x:.2f}<br>%{y:.2%}<extra></extra>",
            )
        )  # fmt: skip
    fig.add_vline(x=1.0, line={"dash": "dot", "color": "#888"})
    what = {"drop_rate": "routed slots dropped", "token_drop_rate": "tokens with a dropped slot"}.get(y, y)
    fig.update_layout(
        title=title or "Tokens dropped at a given expert capacity",
        xaxis={"title": {"text": "capacity factor (slots per expert / fair share)"}},
        yaxis={"title": {"text": what}, "tickformat": ".0%", "rangemode": "tozero"},
        height=420,
    )
    return fig


def placement_bars(
    frame: pd.DataFrame,
    *,
    measure: str = "max_over_mean",
    strategies: Sequence[str] = ("contiguous", "greedy"),
    title: str | None = None,
    y: str | None = None,
) -> go.Figure:
    """Expert-placement what-if: the busiest device's load (over the mean) per decoder layer and strategy.

    ``frame`` is an ``expert_placement`` frame (``layer, devices, <measure>_<strategy>``); grouped bars per
    layer, one colour per strategy, one panel per device count. Dotted: perfectly balanced devices. ``y`` is
    an alias of ``measure`` (the role name every plot uses).
    """
    measure = y or measure
    cols = [f"{measure}_{st}" for st in strategies]
    require_columns(frame, ["layer", *cols], "placement_bars")
    devices = sorted(pd.unique(frame["devices"]).tolist()) if "devices" in frame.columns else [None]
    fig = make_subplots(
        rows=1,
        cols=len(devices),
        shared_yaxes=True,
        subplot_titles=[f"{d} devices" for d in devices] if devices != [None] else None,
    )
    palette = colorway()
    for c, d in enumerate(devices, start=1):
        sub = frame if d is None else frame[frame["devices"] == d]
        sub = sub.sort_values("layer")
        for i, (st, col) in enumerate(zip(strategies, cols, strict=True)):
            fig.add_trace(
                go.Bar(
                    x=sub["layer"].astype(str), y=sub[col], name=st, legendgroup=st, showlegend=c == 1,
                    marker={"color": palette[i % len(palette)]},
                    hovertemplate=f"decoder layer %{{x}}<br>{st}: {measure} %{{y:.3f}}<extra>{d or ''} devices</extra>",
                ),
                row=1, col=c,
            )  # fmt: skip
        fig.update_xaxes(title_text="decoder layer", type="category", row=1, col=c)
    ideal = 1.0 if measure in {"max_over_mean", "balancedness"} else None
    if ideal is not None:
        fig.add_hline(y=ideal, line={"dash": "dot", "color": "#555"})
    fig.update_yaxes(title_text=measure.replace("_", " "), row=1, col=1)
    fig.update_layout(
        title=title or "Expert placement what-if: load of the busiest device (1 = balanced)",
        barmode="group",
        height=420,
        width=max(700, 420 * len(devices)),
    )
    return fig


def expert_load_heatmap_static(
    load: RoutingTrace | pd.DataFrame, *, relative: bool = False, ax: Any = None
) -> Any:
    """Static (seaborn) version of :func:`expert_load_heatmap`; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    share = load_matrix(metric_frame(load, M.expert_load), "share")
    data = share * share.shape[1] if relative else share
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(16, 2 + 0.32 * share.shape[1]), 1.5 + 0.35 * share.shape[0]))
    else:
        fig = ax.figure
    sns.heatmap(
        data,
        ax=ax,
        cmap="RdBu_r" if relative else "viridis",
        center=1.0 if relative else None,
        vmin=None if relative else 0.0,
        cbar_kws={"label": "load / fair share" if relative else "share"},
        linewidths=0,
    )
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_title(
        "Expert load relative to a uniform router" if relative else "Expert load (share of routed slots)"
    )
    return fig
