"""Per-language metrics against scipy (jensenshannon, entropy) and brute-force loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

import moe_routing as mr
from moe_routing import MetricError, RoutingTrace

from .conftest import make_trace


def usage(trace: RoutingTrace, lang: str, li: int) -> np.ndarray:
    ids = trace.expert_ids[trace.labels["lang"] == lang, li]
    return np.bincount(ids[ids >= 0], minlength=trace.num_experts).astype(float)


def test_language_divergence_is_scipy_jensenshannon_squared(skewed):
    df = mr.metrics.language_divergence(skewed, n_boot=50)
    assert len(df) == 3 * skewed.num_layers
    for row in df.itertuples():
        li = skewed.layer_index(row.layer)
        ref = jensenshannon(usage(skewed, row.a, li), usage(skewed, row.b, li), base=2) ** 2
        assert row.js == pytest.approx(ref)
        assert row.floor < row.js  # the skewed trace routes by language
        assert row.ci_low <= row.ci_high
    assert set(zip(df.a, df.b, strict=True)) == {("de", "en"), ("de", "ja"), ("en", "ja")}


def test_language_divergence_floor_without_language_effect():
    t = make_trace(20, n_docs=30, doc_len=(40, 60))
    df = mr.metrics.language_divergence(t, n_boot=0, n_shuffles=20)
    # no language effect: the measured divergence is of the order of its shuffled floor
    assert (df.js < 4 * df.floor).all()
    assert df.ci_low.isna().all()


def _two_languages(p: np.ndarray, q: np.ndarray, docs: int, doc_len: int, seed: int) -> RoutingTrace:
    """Top-1 routing of two languages drawn from known expert distributions p and q, ``docs`` documents each."""
    rng = np.random.default_rng(seed)
    n = 2 * docs * doc_len
    doc = np.repeat(np.arange(2 * docs), doc_len)
    lang = np.where(doc % 2 == 0, "a", "b")
    ids = np.where(lang == "a", rng.choice(len(p), size=n, p=p), rng.choice(len(q), size=n, p=q))
    return RoutingTrace.from_arrays(ids[:, None, None].astype(np.int16), np.ones((n, 1, 1), np.float32),
                                    num_experts=len(p), doc_ids=doc, labels={"lang": lang})


@pytest.mark.parametrize("shift", [0.0, 0.15, 0.5])
def test_language_divergence_interval_is_calibrated_for_a_known_divergence(shift):
    """Issue 10 bug fix: the plain percentile interval of a JS sits above the estimate by the plug-in bias and
    almost never covers a true divergence of 0; the bias-shifted interval covers the truth near 95%."""
    from moe_routing.metrics._stats import js_divergence

    e = 8
    p = np.full(e, 1 / e)
    q = p.copy()
    q[0] += shift / 2
    q[1:3] -= shift / 4
    truth = float(js_divergence(p, q))
    covered = plain = 0
    n_sim = 40
    for seed in range(n_sim):
        df = mr.metrics.language_divergence(_two_languages(p, q, 20, 30, seed), n_boot=200, n_shuffles=0,
                                            seed=seed)
        row = df.iloc[0]
        assert row.ci_low <= row.js_corrected <= row.ci_high + 1e-12
        assert row.ci_low_percentile <= row.js <= row.ci_high_percentile or shift == 0.0
        covered += row.ci_low <= truth <= row.ci_high
        plain += row.ci_low_percentile <= truth <= row.ci_high_percentile
    assert covered / n_sim >= 0.85
    if shift == 0.0:
        assert plain / n_sim <= 0.1  # the bug: the percentile interval excludes a true 0


def test_language_divergence_excess_is_js_minus_its_floor(skewed):
    df = mr.metrics.language_divergence(skewed, n_boot=20, n_shuffles=3)
    np.testing.assert_allclose(df.excess, df.js - df.floor)
    assert (df.excess > 0).all()  # the skewed trace routes by language


def doc_distributions(trace: RoutingTrace, source: str) -> dict[int, np.ndarray]:
    out = {}
    for d in np.unique(trace.doc_ids):
        m = trace.doc_ids == d
        if source == "logits":
            x = trace.router_logits[m].astype(np.float64)
            p = np.exp(x - x.max(axis=2, keepdims=True))
            p /= p.sum(axis=2, keepdims=True)
            out[int(d)] = p.mean(axis=0)
        else:
            q = np.zeros((trace.num_layers, trace.num_experts))
            for t in np.flatnonzero(m):
                for li in range(trace.num_layers):
                    ids = trace.expert_ids[t, li]
                    valid = ids >= 0
                    if source == "counts":
                        q[li, ids[valid]] += 1 / valid.sum()
                    else:
                        w = trace.weights[t, li][valid]
                        q[li, ids[valid]] += w / w.sum()
            out[int(d)] = q / m.sum()
    return out


def ent_div(p: np.ndarray, q: np.ndarray) -> float:
    js = jensenshannon(p, q, base=2) ** 2
    return js / ((scipy.stats.entropy(p, base=2) + scipy.stats.entropy(q, base=2)) / 2)


@pytest.mark.parametrize("source", ["logits", "weights", "counts"])
def test_reference_divergence_by_language(source):
    t = make_trace(21, logits=True, skew=1.0, n_docs=9)
    df = mr.metrics.reference_divergence(t, "lang", "en", source=source, n_boot=30)
    q = doc_distributions(t, source)
    lang_of = {int(d): t.labels["lang"][t.doc_ids == d][0] for d in np.unique(t.doc_ids)}
    mean = {lang: np.mean([q[d] for d in q if lang_of[d] == lang], axis=0) for lang in ("en", "de", "ja")}
    for row in df.itertuples():
        li = t.layer_index(row.layer)
        assert row.divergence == pytest.approx(ent_div(mean[row.lang][li], mean["en"][li]), rel=1e-6, abs=1e-12)
        ent = np.mean([scipy.stats.entropy(q[d][li]) / np.log(8) for d in q if lang_of[d] == row.lang])
        assert row.entropy_norm == pytest.approx(ent)
    assert (df[df.lang == "en"].divergence.abs() < 1e-12).all()
    assert (df[df.lang != "en"].divergence > 0).all()


def test_reference_divergence_over_parallel_pairs():
    t = make_trace(22, logits=True, skew=1.0, n_docs=12)
    df = mr.metrics.reference_divergence(t, "lang", "en", pair_label="pair", source="logits", n_boot=40,
                                         normalize="none")
    q = doc_distributions(t, "logits")
    info = {int(d): (t.labels["lang"][t.doc_ids == d][0], int(t.labels["pair"][t.doc_ids == d][0]))
            for d in np.unique(t.doc_ids)}
    ref = {pair: d for d, (lang, pair) in info.items() if lang == "en"}
    for row in df.itertuples():
        li = t.layer_index(row.layer)
        vals = [jensenshannon(q[d][li], q[ref[p]][li], base=2) ** 2 for d, (lang, p) in info.items()
                if lang == row.lang]
        assert row.divergence == pytest.approx(np.mean(vals), abs=1e-12)
        assert row.n == len(vals)
    assert (df.ci_low <= df.divergence + 1e-12).all()


def test_reference_divergence_errors(trace):
    with pytest.raises(MetricError, match="reference language is missing"):
        mr.metrics.reference_divergence(trace, reference="fr")
    with pytest.raises(MetricError, match="logits=True"):
        mr.metrics.reference_divergence(trace, source="logits")
    no_w = RoutingTrace.from_arrays(trace.expert_ids, layers=trace.layers, num_experts=8, labels=trace.labels,
                                    doc_ids=trace.doc_ids)
    with pytest.raises(MetricError, match="no weights"):
        mr.metrics.reference_divergence(no_w, source="weights")
    assert len(mr.metrics.reference_divergence(no_w, n_boot=0)) == 9  # auto falls back to counts


def test_top_expert_overlap_matches_sets(skewed):
    df = mr.metrics.top_expert_overlap(skewed, n=3)
    for row in df.itertuples():
        li = skewed.layer_index(row.layer)
        a = set(np.argsort(-usage(skewed, row.a, li), kind="stable")[:3].tolist())
        b = set(np.argsort(-usage(skewed, row.b, li), kind="stable")[:3].tolist())
        assert row.overlap == pytest.approx(len(a & b) / 3)
        assert row.jaccard == pytest.approx(len(a & b) / len(a | b))
    rng = np.random.default_rng(0)
    sim = []
    for _ in range(4000):
        a, b = set(rng.choice(8, 3, replace=False)), set(rng.choice(8, 3, replace=False))
        sim.append(len(a & b) / len(a | b))
    assert df.random_jaccard.iloc[0] == pytest.approx(np.mean(sim), abs=0.01)
    assert df.random_overlap.iloc[0] == pytest.approx(3 / 8)


def test_language_experts_brute_force():
    t = make_trace(23, skew=3.0, n_docs=18, num_experts=8, top_k=2)
    df = mr.metrics.language_experts(t, threshold=0.15)
    langs = ["de", "en", "ja"]
    for row in df.itertuples():
        li = t.layer_index(row.layer)
        freq = {lang: usage(t, lang, li)[row.expert] / (t.labels["lang"] == lang).sum() for lang in langs}
        best = max(freq, key=freq.get)
        runner = max(v for lang, v in freq.items() if lang != best)
        if freq[best] - runner >= 0.15:
            assert row.kind == "specific" and row.lang == best
        elif min(freq.values()) >= 2 / 8 and max(freq.values()) - min(freq.values()) < 0.15:
            assert row.kind == "shared"
        else:
            assert row.kind == "other"
    assert (df.kind == "specific").any()  # skew routes each language to its own expert


def test_language_metrics_need_two_languages(trace):
    en = trace.where(lang="en")
    with pytest.raises(MetricError, match="two"):
        mr.metrics.language_divergence(en)
    with pytest.raises(MetricError, match="two"):
        mr.metrics.language_experts(en)


def test_pairs_are_unordered_combinations(skewed):
    df = mr.metrics.top_expert_overlap(skewed)
    assert len(df) == len(list(itertools.combinations("abc", 2))) * skewed.num_layers


@pytest.mark.filterwarnings("ignore:label 'lang' has values")
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), skew=st.floats(0, 3), e=st.integers(3, 9))
def test_js_bounds_symmetry_and_relabelling(seed, skew, e):
    t = make_trace(seed, skew=skew, num_experts=e, n_docs=6)
    df = mr.metrics.language_divergence(t, n_boot=0, n_shuffles=0)
    assert df.js.between(0, 1).all()
    perm = np.random.default_rng(seed).permutation(e)
    t2 = RoutingTrace.from_arrays(perm[t.expert_ids], t.weights, layers=t.layers, num_experts=e,
                                  labels=t.labels, doc_ids=t.doc_ids)
    assert np.allclose(df.js, mr.metrics.language_divergence(t2, n_boot=0, n_shuffles=0).js)
    swapped = t.with_labels(lang=np.where(t.labels["lang"] == "en", "de", np.where(t.labels["lang"] == "de", "en",
                                                                                   t.labels["lang"])))
    sw = mr.metrics.language_divergence(swapped, n_boot=0, n_shuffles=0)
    assert np.isclose(df[(df.a == "de") & (df.b == "ja")].js.to_numpy(), sw[(sw.a == "en") & (sw.b == "ja")].js.to_numpy()).all()


def test_reference_divergence_on_zaya_logits_wider_than_the_experts():
    """zaya's router scores E experts plus a skip class: the logits are E + 1 wide. The divergence is taken over
    the experts (softmax over the first E columns, the distribution given the token is routed), not refused."""
    import torch

    import arch_configs as ac

    model = ac.build(ac.ARCHS["zaya"])
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, ac.VOCAB, (6, 12), generator=g)
    with torch.no_grad(), mr.capture(model, logits=True) as rec:
        model(input_ids=ids)
    t = rec.trace(labels={"lang": np.array(["en", "de", "ja"] * 2)})
    assert t.router_logits.shape[2] == t.num_experts + 1
    df = mr.metrics.reference_divergence(t, "lang", "en", source="logits", n_boot=10)
    e = t.num_experts
    q = {}
    for d in np.unique(t.doc_ids):
        x = t.router_logits[t.doc_ids == d][:, :, :e].astype(np.float64)
        p = np.exp(x - x.max(axis=2, keepdims=True))
        q[int(d)] = (p / p.sum(axis=2, keepdims=True)).mean(axis=0)
    lang_of = {int(d): t.labels["lang"][t.doc_ids == d][0] for d in np.unique(t.doc_ids)}
    mean = {lang: np.mean([q[d] for d in q if lang_of[d] == lang], axis=0) for lang in ("en", "de", "ja")}
    assert len(df) == 3 * t.num_layers
    for row in df.itertuples():
        li = t.layer_index(row.layer)
        assert row.divergence == pytest.approx(ent_div(mean[row.lang][li], mean["en"][li]), rel=1e-6, abs=1e-12)


def test_reference_divergence_logits_padded_with_nan_for_a_narrower_layer():
    """A layer with fewer router columns than the widest is NaN-padded: those columns have probability 0."""
    t = make_trace(23, logits=True, skew=1.0, n_docs=9)
    logits = t.router_logits.copy()
    logits[:, 0, -1] = np.nan  # layer 0 scores only 7 of the 8 columns
    padded = RoutingTrace.from_arrays(np.where(t.expert_ids == 7, 0, t.expert_ids), t.weights, layers=t.layers,
                                      num_experts=8, labels=t.labels, token_ids=t.token_ids, doc_ids=t.doc_ids,
                                      positions=t.positions, router_logits=logits)
    df = mr.metrics.reference_divergence(padded, "lang", "en", source="logits", n_boot=0)
    assert np.isfinite(df.divergence).all() and np.isfinite(df.entropy_norm).all()
    narrower = make_trace(23, logits=True, skew=1.0, n_docs=9)
    x = narrower.router_logits[:, :1, :7].astype(np.float64)
    p = np.exp(x - x.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    en = narrower.labels["lang"] == "en"
    de = narrower.labels["lang"] == "de"
    q_en = np.mean([p[(narrower.doc_ids == d)].mean(axis=0)[0] for d in np.unique(narrower.doc_ids[en])], axis=0)
    q_de = np.mean([p[(narrower.doc_ids == d)].mean(axis=0)[0] for d in np.unique(narrower.doc_ids[de])], axis=0)
    row = df[(df.lang == "de") & (df.layer == t.layers[0])].iloc[0]
    assert row.divergence == pytest.approx(ent_div(np.r_[q_de, 0.0], np.r_[q_en, 0.0]), rel=1e-6)
