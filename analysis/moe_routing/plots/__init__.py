"""Figures of routing traces and metric frames.

Every function returns a ``plotly.graph_objects.Figure`` (interactive) or, for ``*_static``, a matplotlib
Figure drawn with seaborn; nothing here calls ``.show()``. Layers are labelled with their decoder-layer
index (``trace.layers``), experts with their ids, languages with their names.

>>> import moe_routing.plots as mp
>>> mp.use_theme()                       # light template for plotly + seaborn
>>> mp.token_expert_text(trace, doc_id=0, tokenizer=tok)
>>> mp.save_figure(fig, "figures/load.png")
"""

from __future__ import annotations

from ._common import language_name, token_strings
from .contrast import (
    differential_usage,
    divergence_matrix_heatmap,
    divergence_over_depth,
    usage_difference_heatmap,
)
from .export import BrowserNotFoundError, find_browser, save_figure, save_figures
from .language import divergence_to_reference, language_divergence_heatmap, language_usage_heatmap
from .load import (
    capacity_drop_curves,
    expert_load_heatmap,
    expert_load_heatmap_static,
    load_balance_lines,
    load_distribution,
    placement_bars,
)
from .sequence import consecutive_same_expert_plot, expert_by_position
from .specialization import (
    coactivation_heatmap,
    label_usage_heatmap,
    label_usage_heatmap_static,
    nmi_by_layer,
    nmi_by_layer_static,
    top1_sankey,
)
from .theme import DARK, LIGHT, expert_color, expert_colors, seaborn_style, use_theme
from .tokens import router_heatmap, router_probabilities, token_expert_text

__all__ = [
    "DARK",
    "LIGHT",
    "BrowserNotFoundError",
    "capacity_drop_curves",
    "coactivation_heatmap",
    "consecutive_same_expert_plot",
    "differential_usage",
    "divergence_matrix_heatmap",
    "divergence_over_depth",
    "divergence_to_reference",
    "expert_by_position",
    "expert_color",
    "expert_colors",
    "expert_load_heatmap",
    "expert_load_heatmap_static",
    "find_browser",
    "label_usage_heatmap",
    "label_usage_heatmap_static",
    "language_divergence_heatmap",
    "language_name",
    "language_usage_heatmap",
    "load_balance_lines",
    "load_distribution",
    "nmi_by_layer",
    "nmi_by_layer_static",
    "placement_bars",
    "router_heatmap",
    "router_probabilities",
    "save_figure",
    "save_figures",
    "seaborn_style",
    "token_expert_text",
    "token_strings",
    "top1_sankey",
    "usage_difference_heatmap",
    "use_theme",
]
