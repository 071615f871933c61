"""Figures of causal checks: ablation matrices, claims against random sets, expert importance, ablation modes and
steering curves. Every function takes the frames ``moe_routing.metrics.causal`` returns and gives a
``plotly.graph_objects.Figure``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import MetricError
from ._common import label_names, require_columns
from .theme import DIVERGING, colorway

_NATS = "NLL change (nats/token)"


def _symmetric_range(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def ablation_matrix_heatmap(frame: pd.DataFrame, *, by: str = "lang", mode: str | None = None,
                            title: str | None = None) -> go.Figure:
    """Heatmap ``[ablated set x evaluated value]`` of the NLL change, from ``ablation_matrix(...).frame``.

    Colour: ``delta`` (diverging, 0 = white). A cell is marked with a star when its interval's low end lies
    above the random sets' high end for that value (only where random sets were run, i.e. the first mode).
    Hover: the interval and the random sets' mean and interval.
    """
    require_columns(frame, ["set", "mode", by, "delta", "ci_low", "ci_high", "random", "random_high"],
                    "ablation_matrix_heatmap")
    mode = str(frame["mode"].iloc[0]) if mode is None else mode
    sub = frame[frame["mode"] == mode]
    if sub.empty:
        raise MetricError(f"no rows for mode {mode!r}; modes: {sorted(set(frame['mode']))}.")
    sets = list(dict.fromkeys(sub["set"]))
    values = list(dict.fromkeys(sub[by]))

    def grid(col: str) -> np.ndarray:
        return sub.pivot(index="set", columns=by, values=col).reindex(index=sets, columns=values).to_numpy(float)

    z, lo, hi, rnd, rhi = (grid(c) for c in ("delta", "ci_low", "ci_high", "random", "random_high"))
    above = np.isfinite(rhi) & (lo > rhi)
    text = np.where(above, "★", "")
    hover = np.empty(z.shape, dtype=object)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            r = "" if not np.isfinite(rnd[i, j]) else f"<br>random sets {rnd[i, j]:+.3f} (high end {rhi[i, j]:+.3f})"
            hover[i, j] = f"{z[i, j]:+.3f} [{lo[i, j]:+.3f}, {hi[i, j]:+.3f}]{r}"
    cols, rows = label_names(values, by), [f"{n} set" for n in label_names(sets, by)]
    zmax = _symmetric_range(z)
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, text=text, texttemplate="%{text}", customdata=hover,
                               colorscale=DIVERGING, zmin=-zmax, zmax=zmax,
                               colorbar={"title": {"text": "nats/token"}},
                               hovertemplate="ablated: %{y}<br>evaluated: %{x}<br>%{customdata}<extra></extra>"))
    fig.update_layout(title=title or f"NLL change when each set is ablated ({mode}); ★ above the random sets",
                      xaxis_title=f"evaluated {by}", yaxis_title="ablated set", yaxis={"autorange": "reversed"},
                      height=max(320, 28 * len(sets) + 160))
    return fig


def claims_plot(claims: Mapping[Any, Any], *, by: str = "lang", title: str | None = None) -> go.Figure:
    """Per claim (``{value: CausalClaim}``): the effect on its own value, on the others pooled and of random sets
    of the same size on its value, each with its interval (points with error bars), one row per claim."""
    if not claims:
        raise MetricError("claims_plot needs at least one CausalClaim.")
    names = list(claims)
    shown = label_names(names, by)
    fig = go.Figure()
    palette = colorway()
    for c, (what, attr) in enumerate((("own", "target"), ("others", "others"), ("random sets", "random"))):
        eff = [getattr(claims[n], attr) for n in names]
        x = np.array([e.delta for e in eff], dtype=float)
        fig.add_trace(go.Scatter(
            x=x, y=shown, mode="markers", name=what, marker={"size": 9, "color": palette[c % len(palette)]},
            error_x={"type": "data", "symmetric": False,
                     "array": np.array([e.ci_high for e in eff], dtype=float) - x,
                     "arrayminus": x - np.array([e.ci_low for e in eff], dtype=float)},
            hovertemplate="%{y}: %{x:+.3f}<extra>" + what + "</extra>"))
    holds = [bool(claims[n].holds) for n in names]
    fig.update_layout(title=title or f"Ablating a {by}'s experts: own vs others vs random sets "
                      f"({sum(holds)} of {len(holds)} claims hold)", xaxis_title=_NATS,
                      yaxis={"autorange": "reversed"}, height=max(320, 30 * len(names) + 160))
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    return fig


def importance_heatmap(frame: pd.DataFrame, *, by: str = "lang", marks: Mapping[int, Any] | None = None,
                       title: str | None = None) -> go.Figure:
    """``[expert x value]`` heatmap of ``expert_importance``'s NLL change (one layer); ``marks``
    ``{expert: value}`` outlines cells (e.g. each language-specific expert's own language)."""
    require_columns(frame, ["layer", "expert", by, "delta", "ci_low", "ci_high"], "importance_heatmap")
    layers = sorted(set(frame["layer"]))
    if len(layers) != 1:
        raise MetricError(f"importance_heatmap shows one layer; the frame has layers {layers}.")
    experts = sorted(set(frame["expert"]))
    values = list(dict.fromkeys(frame[by]))
    piv = {c: frame.pivot(index="expert", columns=by, values=c).reindex(index=experts, columns=values).to_numpy(float)
           for c in ("delta", "ci_low", "ci_high")}
    z = piv["delta"]
    hover = np.vectorize(lambda d, lo, hi: f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]", otypes=[object])(
        z, piv["ci_low"], piv["ci_high"])
    cols = label_names(values, by)
    zmax = _symmetric_range(z)
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=[f"expert {e}" for e in experts], customdata=hover,
                               colorscale=DIVERGING, zmin=-zmax, zmax=zmax,
                               colorbar={"title": {"text": "nats/token"}},
                               hovertemplate="%{y} banned<br>%{x}: %{customdata}<extra></extra>"))
    for e, v in (marks or {}).items():
        if e in experts and v in values:
            i, j = experts.index(e), values.index(v)
            fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, line={"width": 2})
    fig.update_layout(title=title or f"Each expert of layer {layers[0]} banned in turn: NLL change per {by}",
                      xaxis_title=by, yaxis={"autorange": "reversed"}, height=max(320, 24 * len(experts) + 160))
    return fig


def modes_plot(frame: pd.DataFrame, *, by: str = "lang", title: str | None = None) -> go.Figure:
    """Grouped bars: each set's effect on its own value (the matrix diagonal) under every mode, with intervals,
    from ``ablation_matrix(..., modes=[...]).frame``."""
    require_columns(frame, ["set", "mode", by, "delta", "ci_low", "ci_high"], "modes_plot")
    diag = frame[frame["set"] == frame[by]]
    if diag.empty:
        raise MetricError(f"modes_plot needs sets named by a {by} value (the diagonal); got sets "
                          f"{sorted(set(frame['set']), key=str)}.")
    sets = list(dict.fromkeys(diag["set"]))
    fig = go.Figure()
    palette = colorway()
    for c, mode in enumerate(dict.fromkeys(diag["mode"])):
        d = diag[diag["mode"] == mode].set_index("set").reindex(sets)
        y = d["delta"].to_numpy(float)
        fig.add_trace(go.Bar(x=label_names(sets, by), y=y, name=mode, marker_color=palette[c % len(palette)],
                             error_y={"type": "data", "symmetric": False,
                                      "array": d["ci_high"].to_numpy(float) - y,
                                      "arrayminus": y - d["ci_low"].to_numpy(float)}))
    fig.update_layout(barmode="group", title=title or f"Each {by}'s experts removed, three ways: effect on its own "
                      f"{by}", yaxis_title=_NATS, xaxis_title=f"{by} (its own experts removed)", height=420)
    return fig


def steering_plot(frame: pd.DataFrame, *, value: str = "share", target: str = "target script",
                  title: str | None = None) -> go.Figure:
    """Steering curves: ``value`` against ``delta`` for the steering set and the random-set controls.

    ``frame``: columns ``delta, control`` (``"steering set"`` or ``"random set"``), ``set`` (index of the random
    set), ``value`` and optional ``<value>_low, <value>_high`` (interval of the steering set's value). Random sets
    are drawn as a band (min-max over the sets) with their mean.
    """
    require_columns(frame, ["delta", "control", value], "steering_plot")
    fig = go.Figure()
    rnd = frame[frame["control"] == "random set"].groupby("delta")[value].agg(["mean", "min", "max"]).sort_index()
    if len(rnd):
        x = rnd.index.to_numpy(float)
        fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[rnd["max"], rnd["min"][::-1]], fill="toself",
                                 line={"width": 0}, fillcolor="rgba(150,150,150,0.3)", name="random sets (range)",
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=rnd["mean"], mode="lines+markers", line={"dash": "dash", "color": "grey"},
                                 name="random sets (mean)"))
    st = frame[frame["control"] == "steering set"].sort_values("delta")
    if len(st):
        err: dict[str, Any] | None = None
        if {f"{value}_low", f"{value}_high"} <= set(st.columns):
            y = st[value].to_numpy(float)
            err = {"type": "data", "symmetric": False, "array": st[f"{value}_high"].to_numpy(float) - y,
                   "arrayminus": y - st[f"{value}_low"].to_numpy(float)}
        fig.add_trace(go.Scatter(x=st["delta"], y=st[value], mode="lines+markers", name="steering set",
                                 error_y=err, line={"color": colorway()[0], "width": 3}))
    fig.update_layout(title=title or f"Steering: share of {target} in generated text", xaxis_title="bias delta",
                      yaxis_title=f"share of {target}", yaxis={"rangemode": "tozero"}, height=420)
    return fig


__all__: Sequence[str] = ["ablation_matrix_heatmap", "claims_plot", "importance_heatmap", "modes_plot",
                          "steering_plot"]
