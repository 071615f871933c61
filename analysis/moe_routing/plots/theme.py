"""One look for every figure: plotly templates (light and dark), a seaborn style, and fixed colour maps.

``moe_light`` and ``moe_dark`` are registered with ``plotly.io.templates`` on import; :func:`use_theme` makes
one the default for plotly and matplotlib/seaborn alike. Experts get stable categorical colours from
:func:`expert_colors` so that expert 7 has the same colour in every figure of a notebook.
"""

from __future__ import annotations

import colorsys
from functools import lru_cache

import plotly.graph_objects as go
import plotly.io as pio

from ..errors import PlotError

LIGHT = "moe_light"
DARK = "moe_dark"

FONT = "Inter, 'Helvetica Neue', Arial, sans-serif"
MONO = "'DejaVu Sans Mono', Menlo, Consolas, monospace"

#: sequential scale for shares / probabilities (0 = white-ish, 1 = dark)
SEQUENTIAL = "Viridis"
#: diverging scale for differences and ratios centred on a neutral value
DIVERGING = "RdBu_r"
#: colour of an empty slot (dropped token, skip expert) and of the "other" group
EMPTY_COLOR = "#bdbdbd"

# Tableau 10 and tab20: readable, colour-blind-friendlier than plotly's default for few experts.
_TAB10 = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]
_TAB20 = [
    "#1f77b4",
    "#aec7e8",
    "#ff7f0e",
    "#ffbb78",
    "#2ca02c",
    "#98df8a",
    "#d62728",
    "#ff9896",
    "#9467bd",
    "#c5b0d5",
    "#8c564b",
    "#c49c94",
    "#e377c2",
    "#f7b6d2",
    "#7f7f7f",
    "#c7c7c7",
    "#bcbd22",
    "#dbdb8d",
    "#17becf",
    "#9edae5",
]


def _template(dark: bool) -> go.layout.Template:
    base = pio.templates["plotly_dark" if dark else "plotly_white"]
    t = go.layout.Template(base)
    fg = "#e8e8e8" if dark else "#222222"
    grid = "#3a3a3a" if dark else "#e6e6e6"
    t.layout.font = {"family": FONT, "size": 13, "color": fg}
    t.layout.title = {"font": {"size": 16}, "x": 0.01, "xanchor": "left"}
    t.layout.margin = {"l": 70, "r": 30, "t": 70, "b": 60}
    t.layout.colorway = _TAB10
    t.layout.xaxis = {"gridcolor": grid, "zeroline": False, "automargin": True, "title": {"standoff": 8}}
    t.layout.yaxis = {"gridcolor": grid, "zeroline": False, "automargin": True, "title": {"standoff": 8}}
    t.layout.hoverlabel = {"font": {"family": MONO, "size": 12}}
    t.layout.coloraxis = {"colorscale": SEQUENTIAL}
    t.data.heatmap = [go.Heatmap(colorscale=SEQUENTIAL)]
    if dark:
        t.layout.paper_bgcolor = "#111418"
        t.layout.plot_bgcolor = "#111418"
    return t


pio.templates[LIGHT] = _template(dark=False)
pio.templates[DARK] = _template(dark=True)


def use_theme(dark: bool = False, *, seaborn: bool = True) -> str:
    """Make ``moe_light`` (or ``moe_dark``) plotly's default template and, if asked, set the seaborn style.

    Returns the template name.
    """
    name = DARK if dark else LIGHT
    pio.templates.default = name
    if seaborn:
        seaborn_style(dark=dark)
    return name


def seaborn_style(dark: bool = False) -> None:
    """Set seaborn/matplotlib defaults that match the plotly templates (static figures)."""
    import seaborn as sns

    sns.set_theme(
        context="notebook",
        style="darkgrid" if dark else "whitegrid",
        palette=_TAB10,
        rc={
            "figure.dpi": 110,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "axes.titlelocation": "left",
            "axes.titlesize": 13,
            **(
                {
                    "figure.facecolor": "#111418",
                    "axes.facecolor": "#1b1f24",
                    "text.color": "#e8e8e8",
                    "axes.labelcolor": "#e8e8e8",
                    "xtick.color": "#e8e8e8",
                    "ytick.color": "#e8e8e8",
                }
                if dark
                else {}
            ),
        },
    )


@lru_cache(maxsize=32)
def _expert_colors(n: int) -> tuple[str, ...]:
    if n <= len(_TAB10):
        return tuple(_TAB10[:n])
    if n <= len(_TAB20):
        # tab20's dark colours first, then the light ones: neighbouring experts never share a hue
        return tuple((_TAB20[0::2] + _TAB20[1::2])[:n])
    out = []
    golden = 0.618033988749895
    for i in range(n):
        hue = (i * golden) % 1.0
        light = (0.42, 0.58, 0.70)[i % 3]
        sat = (0.75, 0.60)[(i // 3) % 2]
        r, g, b = colorsys.hls_to_rgb(hue, light, sat)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return tuple(out)


def expert_colors(num_experts: int) -> list[str]:
    """``num_experts`` distinct hex colours; colour ``i`` belongs to expert ``i`` (stable across figures)."""
    if num_experts <= 0:
        raise PlotError(f"num_experts must be positive, got {num_experts}.")
    return list(_expert_colors(int(num_experts)))


def expert_color(expert: int, num_experts: int) -> str:
    """Colour of one expert; :data:`EMPTY_COLOR` for an empty slot (``-1``)."""
    return EMPTY_COLOR if expert < 0 else _expert_colors(int(num_experts))[int(expert)]


def text_color_on(background: str) -> str:
    """Black or white, whichever reads better on the hex colour ``background``."""
    h = background.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) / 255 for i in (0, 2, 4))
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "#111111" if lum > 0.55 else "#ffffff"


def colorway() -> list[str]:
    """Categorical colours of the current default plotly template (for lines grouped by a column)."""
    tpl = pio.templates.default
    names = tpl.split("+") if isinstance(tpl, str) else []
    for name in reversed(names):
        cw = pio.templates[name].layout.colorway
        if cw:
            return list(cw)
    return list(_TAB10)
