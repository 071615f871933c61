"""Token views: text coloured by first-choice expert (layer slider) and the router heatmap of one prompt."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moe_routing import RoutingTrace, TraceError
from moe_routing.plots import expert_color, router_heatmap, router_probabilities, token_expert_text
from moe_routing.plots.tokens import _layout_tokens

from ._synth import LAYERS, make_trace, token_texts


def test_one_trace_and_slider_step_per_moe_layer(trace: RoutingTrace, texts: list[str]) -> None:
    fig = token_expert_text(trace, doc_id=1, tokens=texts)
    assert len(fig.data) == trace.num_layers == len(LAYERS)
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == [str(x) for x in LAYERS]  # decoder-layer indices, not 0..L-1
    for i, step in enumerate(steps):
        visible = step.args[0]["visible"]
        assert visible == [j == i for j in range(len(LAYERS))]
    assert [t.visible for t in fig.data] == [True] + [False] * (len(LAYERS) - 1)
    assert "decoder layer" in fig.layout.sliders[0].currentvalue.prefix


def test_token_colour_is_its_first_choice_expert(trace: RoutingTrace, texts: list[str]) -> None:
    fig = token_expert_text(trace, doc_id=1, tokens=texts)
    idx = np.flatnonzero(trace.doc_ids == 1)
    top1 = trace.top1()
    for li, bar in enumerate(fig.data):
        assert len(bar.marker.color) == len(idx)
        expected = [expert_color(int(top1[i, li]), trace.num_experts) for i in idx]
        assert list(bar.marker.color) == expected
        assert list(bar.customdata) == [int(top1[i, li]) for i in idx]
    # the colours differ between layers where the first choice differs
    assert fig.data[0].marker.color != fig.data[1].marker.color


def test_hover_shows_token_ids_and_weights(trace: RoutingTrace, texts: list[str]) -> None:
    fig = token_expert_text(trace, doc_id=0, tokens=texts, layers=[5])
    assert len(fig.data) == 1 and fig.layout.sliders[0].steps[0].label == "5"
    li = trace.layer_index(5)
    hover = fig.data[0].hovertext[1]  # token " quick"
    assert "␣quick" in hover and "decoder layer: 5" in hover
    for e, w in zip(trace.expert_ids[1, li], trace.weights[1, li], strict=True):
        assert f"{int(e)} ({w:.3f})" in hover


def test_tokenizer_decodes_ids(tokenizer) -> None:
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    n = len(ids)
    tr = RoutingTrace.from_arrays(
        np.zeros((n, 2, 1), dtype=np.int16), np.ones((n, 2, 1)), layers=[0, 2], num_experts=4, token_ids=ids
    )
    fig = token_expert_text(tr, tokenizer=tokenizer)
    shown = "".join(fig.data[0].text).replace("\u00a0", " ")
    pieces = [tokenizer.decode([i]) for i in ids]
    # whitespace-only tokens are drawn as middle dots (visible boxes), every other piece as itself
    assert shown == "".join("·" * len(p) if p and not p.strip(" ") else p for p in pieces)
    assert shown.replace("·", " ") == "The quick brown fox jumps over the lazy dog."
    for piece, hover in zip(pieces, fig.data[0].hovertext, strict=True):
        assert hover.startswith("token: " + piece.replace(" ", "␣") + "<br>")


def test_layout_flows_lines_and_breaks_at_newlines() -> None:
    toks = ["Hello", " world", "\n", "next", " line", "\nDer", " x" * 1, *[" word"] * 30]
    shown, x0, w, row = _layout_tokens(toks, line_chars=40)
    assert row[0] == row[1] == row[2] == 0
    assert row[3] == 1 and x0[3] == 0  # after the newline token
    assert row[5] == 2 and x0[5] == 0 and shown[5] == "Der"  # a leading newline breaks before the word
    assert np.all(x0 + w <= 40)
    for r in np.unique(row):  # no overlap within a line
        sel = np.flatnonzero(row == r)
        assert np.all(x0[sel][1:] >= (x0 + w)[sel][:-1])
    assert shown[1] == "\u00a0world"  # spaces survive SVG rendering


def test_empty_first_choice_is_grey() -> None:
    ids = np.array([[[2, 1]], [[-1, -1]], [[0, -1]]], dtype=np.int16)
    w = np.array([[[0.6, 0.4]], [[np.nan, np.nan]], [[1.0, np.nan]]])
    tr = RoutingTrace.from_arrays(ids, w, layers=[4], num_experts=3)
    fig = token_expert_text(tr, tokens=["a", "b", "c"])
    assert fig.data[0].marker.color[1] == expert_color(-1, 3)
    assert "- (empty)" in fig.data[0].hovertext[1]


def test_bad_layer_doc_and_tokens_raise(trace: RoutingTrace, texts: list[str]) -> None:
    with pytest.raises(TraceError, match=r"layer 2 is not a MoE layer.*\[1, 3, 5, 7\]"):
        token_expert_text(trace, tokens=texts, layers=[2])
    with pytest.raises(TraceError, match="doc_id 9 is not in this trace"):
        token_expert_text(trace, doc_id=9, tokens=texts)
    with pytest.raises(TraceError, match="one per token"):
        token_expert_text(trace, tokens=texts[:-1])
    with pytest.raises(TraceError, match="layer 0 is not a MoE layer"):
        router_heatmap(trace, layer=0)


def test_router_heatmap_softmax_of_logits(trace: RoutingTrace, texts: list[str]) -> None:
    fig = router_heatmap(trace, doc_id=2, layer=3, tokens=texts)
    heat, marks = fig.data
    z = np.asarray(heat.z)
    idx = np.flatnonzero(trace.doc_ids == 2)
    logits = trace.router_logits[idx, trace.layer_index(3)].astype(np.float64)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert z.shape == (len(idx), trace.num_experts)
    np.testing.assert_allclose(z, expected, rtol=1e-6)
    np.testing.assert_allclose(z.sum(axis=1), 1.0)
    assert "softmax" in fig.layout.title.text and "layer 3" in fig.layout.title.text
    assert list(heat.x) == list(range(trace.num_experts))
    assert fig.layout.yaxis.ticktext[1] == "1: ␣quick"
    # the top-k markers sit exactly on the chosen experts
    li = trace.layer_index(3)
    chosen = {(r, int(e)) for r, i in enumerate(idx) for e in trace.expert_ids[i, li]}
    assert set(zip(marks.y, marks.x, strict=True)) == chosen


def test_router_heatmap_without_logits_uses_sparse_weights() -> None:
    tr = make_trace(logits=False)
    fig = router_heatmap(tr, doc_id=0, tokens=token_texts(tr))  # default: first MoE layer
    z = np.asarray(fig.data[0].z)
    assert "sparse" in fig.layout.title.text and "layer 1" in fig.layout.title.text
    assert np.all((z > 0).sum(axis=1) == tr.top_k)
    np.testing.assert_allclose(z.sum(axis=1), 1.0, rtol=1e-6)
    probs, dense = router_probabilities(tr, 1)
    assert not dense and probs.shape == (tr.num_tokens, tr.num_experts)


def test_byte_fallback_pieces_merge_into_their_characters(tokenizer) -> None:
    from moe_routing.plots.tokens import merge_partial_tokens

    text = "敏捷的棕色狐狸跳过了懒狗。"
    ids = tokenizer(text)["input_ids"]
    alone = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in alone) > 0  # the tiny tokenizer splits characters into byte pieces
    groups = merge_partial_tokens(ids, tokenizer)
    assert [a for a, _, _ in groups] == sorted(a for a, _, _ in groups) and groups[-1][1] == len(ids)
    n = len(ids)
    tr = RoutingTrace.from_arrays(np.arange(n, dtype=np.int16).reshape(n, 1, 1) % 4, np.ones((n, 1, 1)),
                                  layers=[0], num_experts=4, token_ids=ids)
    fig = token_expert_text(tr, tokenizer=tokenizer)
    boxes = list(fig.data[0].text)
    assert len(boxes) == len(groups) < n
    assert "".join(boxes) == text and not any("\ufffd" in b or "⟨" in b for b in boxes)
    merged = next(t for t, (a, b, _) in enumerate(groups) if b - a > 1)
    a, b, _ = groups[merged]
    assert f"{b - a} byte pieces, first choices " + ", ".join(str(j % 4) for j in range(a, b)) in \
        fig.data[0].hovertext[merged]


def test_colour_key_names_every_expert(trace: RoutingTrace, texts: list[str]) -> None:
    from moe_routing.plots import expert_color

    fig = token_expert_text(trace, doc_id=0, tokens=texts)
    keys = [a for a in fig.layout.annotations if a.bgcolor]
    assert [a.text for a in keys] == [f"<b>{e}</b>" for e in range(trace.num_experts)]
    assert [a.bgcolor for a in keys] == [expert_color(e, trace.num_experts) for e in range(trace.num_experts)]
    assert not token_expert_text(trace, doc_id=0, tokens=texts, show_key=False).layout.annotations


def test_neighbouring_experts_differ_in_hue() -> None:
    import colorsys

    from moe_routing.plots import expert_colors

    for n in (12, 16, 20):
        hues = [colorsys.rgb_to_hls(*(int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)))[0] for c in expert_colors(n)]
        for a, b in itertools.pairwise(hues):
            assert min(abs(a - b), 1 - abs(a - b)) > 0.02, (n, a, b)
