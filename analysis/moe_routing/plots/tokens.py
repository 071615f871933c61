"""Token-level views: a text coloured by each token's first-choice expert, and one prompt's router heatmap."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..trace import RoutingTrace
from ._common import TokenSource, doc_token_index, layer_positions, layer_slider, token_strings, visible
from .theme import MONO, SEQUENTIAL, expert_color, text_color_on

_NBSP = "\u00a0"


def _slot_summary(ids: np.ndarray, weights: np.ndarray) -> str:
    """``"3 (0.612), 5 (0.388)"`` for one token's slots ``[k]`` (empty slots shown as ``-``)."""
    parts = []
    for e, w in zip(ids.tolist(), weights.tolist(), strict=True):
        if e < 0:
            parts.append("- (empty)")
        elif np.isnan(w):
            parts.append(f"{e}")
        else:
            parts.append(f"{e} ({w:.3f})")
    return ", ".join(parts)


def _layout_tokens(
    texts: Sequence[str], line_chars: int
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Flow tokens into lines of ``line_chars`` monospace cells.

    Returns display strings, x start ``[n]``, width ``[n]`` (cells) and line number ``[n]``.
    """
    shown, x0, width, line = [], [], [], []
    x, row = 0, 0
    for tok in texts:
        body = tok.lstrip("\n")
        lead = len(tok) - len(body)
        if lead and body.strip():  # "\nDer": the newline belongs before the word
            x, row = 0, row + (1 if x > 0 else 0) + lead - 1
            tok = body
        breaks = tok.count("\n")
        disp = tok.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
        if disp and not disp.strip(" "):  # a whitespace-only token: visible as middle dots
            disp = "·" * len(disp)
        disp = disp.replace(" ", _NBSP) or "∅"
        w = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in disp)  # CJK takes two cells
        if x > 0 and x + w > line_chars:
            x, row = 0, row + 1
        shown.append(disp)
        x0.append(x)
        width.append(w)
        line.append(row)
        x += w
        if breaks:
            x, row = 0, row + breaks
    return shown, np.asarray(x0), np.asarray(width), np.asarray(line)


def token_expert_text(
    trace: RoutingTrace,
    doc_id: int | None = None,
    *,
    tokenizer: Any = None,
    tokens: TokenSource = None,
    layers: Sequence[int] | None = None,
    max_tokens: int = 400,
    line_chars: int = 80,
    width: int = 1000,
    title: str | None = None,
    show_key: bool = True,
) -> go.Figure:
    """A document's text with every token's background in the colour of its first-choice expert.

    One ``go.Bar`` trace per MoE layer (tokens are horizontal bars laid out as lines of text) and a slider
    over the decoder layers, as in Fig. 8 of the Mixtral paper. Hover: token text, position, the top-k
    expert ids and their weights. ``tokens`` (strings aligned with the trace, or id -> text) or
    ``tokenizer`` give the text; otherwise token ids are shown. With a tokenizer, byte-fallback pieces of one
    character (which decode to nothing alone) are merged into one box with the character they complete (its
    first piece's colour; hover lists every piece's expert). Whitespace-only tokens show as middle dots. A
    colour key (expert -> colour) sits above the text (``show_key``; up to 64 experts).
    """
    idx = doc_token_index(trace, doc_id, max_tokens)
    doc = int(trace.doc_ids[idx[0]])
    lpos = layer_positions(trace, layers)
    texts = token_strings(trace, tokenizer=tokenizer, tokens=tokens)
    groups = merge_partial_tokens(trace.token_ids[idx], tokenizer) if tokenizer is not None and tokens is None \
        else [(t, t + 1, None) for t in range(len(idx))]
    doc_texts = [texts[idx[a]] if merged is None else merged for a, _b, merged in groups]
    first = np.array([a for a, _b, _m in groups], dtype=int)  # a merged box takes its first piece's expert
    pieces = [b - a for a, b, _m in groups]
    idx_all, idx = idx, idx[first]
    shown, x0, w, row = _layout_tokens(doc_texts, line_chars)
    n_rows = int(row.max()) + 1 if row.size else 1

    px_per_cell = (width - 40) / line_chars
    font_size = float(np.clip(px_per_cell / 0.62, 8, 15))
    row_px = font_size * 2.1
    height = int(n_rows * row_px + 210)  # title 60 + slider 130 + 20

    top1 = trace.top1()
    fig = go.Figure()
    for j, li in enumerate(lpos):
        experts = top1[idx, li].astype(int)
        colors = [expert_color(e, trace.num_experts) for e in experts]
        hover = [
            f"token: {visible(doc_texts[t])!s}<br>position: {int(trace.positions[i])}"
            f"<br>decoder layer: {trace.layers[li]}<br>first choice: {experts[t] if experts[t] >= 0 else 'none'}"
            f"<br>top-{trace.top_k}: {_slot_summary(trace.expert_ids[i, li], trace.weights[i, li])}"
            + (f"<br>{pieces[t]} byte pieces, first choices "
               + ", ".join(str(int(top1[j, li])) for j in idx_all[first[t]:first[t] + pieces[t]])
               if pieces[t] > 1 else "")
            for t, i in enumerate(idx)
        ]
        fig.add_trace(
            go.Bar(
                orientation="h",
                base=x0,
                x=w,
                y=row,
                width=0.82,
                marker={"color": colors, "line": {"width": 0.6, "color": "white"}},
                text=shown,
                textposition="inside",
                insidetextanchor="middle",
                textangle=0,
                constraintext="none",
                textfont={"family": MONO, "size": font_size, "color": [text_color_on(c) for c in colors]},
                hovertext=hover,
                hoverinfo="text",
                customdata=experts,
                name=f"layer {trace.layers[li]}",
                showlegend=False,
                visible=j == 0,
            )
        )
    labels = [trace.layers[li] for li in lpos]
    key = _colour_key(trace.num_experts, width) if show_key else []
    key_px = 30 * (1 + max(0, len(key) - 1) // max(1, int((width - 120) // 34))) if key else 0
    fig.update_layout(
        title=title
        or f"Tokens coloured by first-choice expert · doc {doc}"
        + (f" · {trace.model_name}" if trace.model_name else ""),
        barmode="overlay",
        bargap=0,
        width=width,
        height=height + key_px,
        annotations=key,
        margin={"l": 20, "r": 20, "t": 60 + key_px, "b": 130},  # the layer slider sits in the bottom margin
        xaxis={"visible": False, "range": [-0.5, line_chars + 0.5], "fixedrange": True},
        yaxis={"visible": False, "autorange": "reversed", "range": [n_rows - 0.5, -0.5], "fixedrange": True},
        uniformtext={"minsize": 7, "mode": "show"},
        sliders=[layer_slider(labels)],
        plot_bgcolor="rgba(0,0,0,0)",
    )
    return fig


def merge_partial_tokens(ids: Sequence[int] | np.ndarray, tokenizer: Any, max_pieces: int = 4
                         ) -> list[tuple[int, int, str | None]]:
    """Group a token-id sequence into display boxes ``(start, stop, merged text or None)``.

    A token that decodes alone to an incomplete UTF-8 character (byte fallback: "\ufffd") is joined with the
    following tokens (up to ``max_pieces``) until their joint decode is complete; other tokens stay single
    (``None``: use the token's own string).
    """
    ids = [int(i) for i in ids]
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return [(t, t + 1, None) for t in range(len(ids))]
    out: list[tuple[int, int, str | None]] = []
    t = 0
    while t < len(ids):
        if ids[t] >= 0 and "\ufffd" in decode([ids[t]]):
            for stop in range(t + 2, min(len(ids), t + max_pieces) + 1):
                text = decode(ids[t:stop])
                if "\ufffd" not in text:
                    out.append((t, stop, text))
                    t = stop
                    break
            else:
                out.append((t, t + 1, None))
                t += 1
            continue
        out.append((t, t + 1, None))
        t += 1
    return out


def _colour_key(num_experts: int, width: int, max_experts: int = 64) -> list[dict[str, Any]]:
    """Annotations above the plot: one box per expert in its colour with its id (none past ``max_experts``)."""
    if num_experts > max_experts:
        return [{"text": f"colour = first-choice expert ({num_experts} experts; hover a token for its ids)",
                 "xref": "paper", "yref": "paper", "x": 0, "y": 1, "yshift": 8, "xanchor": "left",
                 "yanchor": "bottom", "showarrow": False}]
    per_row = max(1, int((width - 120) // 34))
    notes: list[dict[str, Any]] = [{"text": "expert:", "xref": "paper", "yref": "paper", "x": 0, "y": 1,
                                    "yshift": 8, "xanchor": "left", "yanchor": "bottom", "showarrow": False}]
    for e in range(num_experts):
        c = expert_color(e, num_experts)
        r, col = divmod(e, per_row)
        notes.append({"text": f"<b>{e}</b>", "xref": "paper", "yref": "paper", "x": 0, "xshift": 64 + 34 * col,
                      "y": 1, "yshift": 8 + 30 * (max(0, (num_experts - 1) // per_row) - r), "xanchor": "left",
                      "yanchor": "bottom", "showarrow": False, "bgcolor": c, "width": 26,
                      "font": {"color": text_color_on(c), "family": MONO, "size": 12}})
    return notes


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[n, experts]`` float logits (NaN treated as -inf)."""
    z = np.nan_to_num(logits.astype(np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max)
    z = z - np.max(z, axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def router_probabilities(
    trace: RoutingTrace, layer: int, index: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """Router probabilities ``[n, experts]`` of decoder layer ``layer`` for tokens ``index`` (all if None).

    Softmax of ``router_logits`` when the trace has them (returns ``True``), else the sparse top-k weights
    (1/k per chosen expert where the trace has no weights) and ``False``.
    """
    li = trace.layer_index(layer)
    idx = np.arange(trace.num_tokens) if index is None else np.asarray(index)
    if trace.router_logits is not None:
        return _softmax(trace.router_logits[idx, li]), True
    ids = trace.expert_ids[idx, li]
    w = trace.weights[idx, li]
    if not trace.has_weights:
        w = np.where(ids >= 0, 1.0 / trace.top_k, 0.0)
    probs = np.zeros((len(idx), trace.num_experts), dtype=np.float64)
    rows = np.repeat(np.arange(len(idx)), trace.top_k).reshape(ids.shape)
    ok = ids >= 0
    np.add.at(probs, (rows[ok], ids[ok].astype(int)), np.nan_to_num(w[ok]))
    return probs, False


def router_heatmap(
    trace: RoutingTrace,
    doc_id: int | None = None,
    layer: int | None = None,
    *,
    tokenizer: Any = None,
    tokens: TokenSource = None,
    max_tokens: int = 64,
    mark_topk: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Router probabilities of one prompt at one layer: tokens (rows, in order) x experts (columns).

    Softmax of ``router_logits`` when captured; otherwise the sparse top-k weights, which the title says.
    ``layer`` is a decoder-layer index (default: the first MoE layer). Open squares mark the top-k choices.
    """
    layer = trace.layers[0] if layer is None else int(layer)
    li = trace.layer_index(layer)
    idx = doc_token_index(trace, doc_id, max_tokens)
    doc = int(trace.doc_ids[idx[0]])
    probs, dense = router_probabilities(trace, layer, idx)
    n, n_exp = probs.shape
    texts = token_strings(trace, tokenizer=tokenizer, tokens=tokens)
    tick = [f"{int(trace.positions[i])}: {visible(texts[i])}" for i in idx]
    what = (
        "router probabilities (softmax of router logits)"
        if dense
        else "top-k routing weights (sparse: no router logits in trace)"
    )
    custom = np.array([[visible(texts[i])] * n_exp for i in idx], dtype=object)
    fig = go.Figure(
        go.Heatmap(
            z=probs,
            x=np.arange(n_exp),
            y=np.arange(n),
            customdata=custom,
            colorscale=SEQUENTIAL,
            zmin=0,
            zmax=float(np.nanmax(probs)) if probs.size else 1.0,
            colorbar={"title": {"text": "probability" if dense else "weight"}},
            hovertemplate="token: %{customdata}<br>expert: %{x}<br>p = %{z:.3f}<extra></extra>",
            name="router",
        )
    )
    if mark_topk:
        ids = trace.expert_ids[idx, li]
        wts = trace.weights[idx, li]
        rr, ss = np.nonzero(ids >= 0)
        fig.add_trace(
            go.Scatter(
                x=ids[rr, ss].astype(int),
                y=rr,
                mode="markers",
                marker={"symbol": "square-open", "size": 11, "color": "#e15759", "line": {"width": 2}},
                name=f"top-{trace.top_k} choice",
                customdata=np.stack([[visible(texts[idx[r]]) for r in rr], ss], axis=1) if rr.size else None,
                text=[f"{x:.3f}" if np.isfinite(x) else "n/a" for x in wts[rr, ss]],
                hovertemplate="token: %{customdata[0]}<br>expert: %{x} (slot %{customdata[1]})"
                "<br>weight: %{text}<extra>top-k</extra>",
            )
        )
    fig.update_layout(
        title=title or f"Decoder layer {layer}: {what} · doc {doc}",
        xaxis={
            "title": {"text": "expert"},
            "dtick": 1 if n_exp <= 32 else None,
            "range": [-0.5, n_exp - 0.5],
        },
        yaxis={
            "title": {"text": "token (position: text)"},
            "tickvals": list(range(n)),
            "ticktext": tick,
            "autorange": "reversed",
            "tickfont": {"family": MONO, "size": 11},
        },
        height=int(max(300, 18 * n + 160)),
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    return fig
