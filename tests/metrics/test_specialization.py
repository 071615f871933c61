"""Specialization and co-activation against scikit-learn, scipy, pandas and brute-force loops."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import mutual_info_score

import moe_routing as mr
from moe_routing import RoutingTrace

from .conftest import make_trace


def test_label_usage_matches_pandas_groupby(skewed):
    df = mr.metrics.label_usage(skewed, "lang")
    long = skewed.to_frame()
    ref = long.groupby(["lang", "layer", "expert"]).size()
    got = df.set_index(["lang", "layer", "expert"])["count"]
    assert got[got > 0].sort_index().equals(ref.sort_index().rename("count").astype(got.dtype))
    for _, g in df.groupby(["lang", "layer"]):
        assert g.share.sum() == pytest.approx(1)
    tokens = pd.Series(skewed.labels["lang"]).value_counts()
    for lang, g in df.groupby("lang"):
        assert (g.tokens == tokens[lang]).all()
        assert np.allclose(g.token_share, g["count"] / tokens[lang])


def test_domain_specialization_columns_and_sums(skewed):
    df = mr.metrics.domain_specialization(skewed, "domain")
    assert {"domain", "layer", "expert", "specialization", "token_share", "purity", "uniform"} <= set(df.columns)
    assert np.allclose(df.groupby(["domain", "layer"]).specialization.sum(), 1)
    purity = df.groupby(["layer", "expert"]).purity.sum()
    assert np.allclose(purity[purity > 0], 1)
    # brute force: slots of the expert in the domain / slots of the domain
    li = 1
    layer = skewed.layers[li]
    mask = skewed.labels["domain"] == "code"
    ids = skewed.expert_ids[mask, li]
    expect = np.bincount(ids[ids >= 0], minlength=skewed.num_experts) / (ids >= 0).sum()
    got = df[(df.domain == "code") & (df.layer == layer)].specialization.to_numpy()
    assert np.allclose(got, expect)
    assert (df.uniform == 1 / skewed.num_experts).all()


def test_label_nmi_matches_sklearn(skewed):
    df = mr.metrics.label_nmi(skewed, "lang")
    assert list(df.columns[:3]) == ["layer", "nmi", "floor"]
    t1 = skewed.top1()
    lab = skewed.labels["lang"]
    h = scipy.stats.entropy(pd.Series(lab).value_counts().to_numpy())
    for li, row in enumerate(df.itertuples()):
        assert row.layer == skewed.layers[li]
        assert row.nmi == pytest.approx(mutual_info_score(lab, t1[:, li]) / h, rel=1e-9)
        assert row.floor < row.nmi


def test_label_nmi_uses_the_largest_weight_slot():
    rng = np.random.default_rng(0)
    n, e = 600, 8
    ids = np.stack([rng.permutation(e)[:2] for _ in range(n)])[:, None, :]
    w = rng.random((n, 1, 2))
    best = np.take_along_axis(ids, np.argmax(w, axis=2)[:, :, None], axis=2)[:, 0, 0]
    t = RoutingTrace.from_arrays(ids, w, num_experts=e, labels={"y": best % 4},
                                 doc_ids=np.arange(n) // 50)
    assert mr.metrics.label_nmi(t, "y").nmi.iloc[0] == pytest.approx(1.0)
    other = ids[:, 0, 0] if not np.all(ids[:, 0, 0] == best) else ids[:, 0, 1]
    t2 = t.with_labels(y=other % 4)
    assert mr.metrics.label_nmi(t2, "y").nmi.iloc[0] < 0.9


def test_label_nmi_floor_equals_shuffled_labels_on_average():
    t = make_trace(7, n_docs=6, doc_len=(30, 40), num_experts=6)
    ours = mr.metrics.label_nmi(t, "lang", n_shuffles=300, seed=1)
    rng = np.random.default_rng(2)
    lab = t.labels["lang"]
    h = scipy.stats.entropy(pd.Series(lab).value_counts().to_numpy())
    t1 = t.top1()
    for li in range(t.num_layers):
        draws = [mutual_info_score(rng.permutation(lab), t1[:, li]) / h for _ in range(300)]
        sd = np.std(draws) / np.sqrt(300)
        assert abs(ours.floor.iloc[li] - np.mean(draws)) < 5 * sd * np.sqrt(2)


@pytest.mark.filterwarnings("ignore:label 'lang' has values")
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), e=st.integers(3, 10), skew=st.floats(0, 3))
def test_label_nmi_bounds_and_invariance(seed, e, skew):
    t = make_trace(seed, num_experts=e, top_k=2, n_docs=6, skew=skew)
    base = mr.metrics.label_nmi(t, "lang", n_shuffles=2)
    assert ((base.nmi >= -1e-12) & (base.nmi <= 1 + 1e-12)).all()
    perm = np.random.default_rng(seed).permutation(e)
    relabelled = RoutingTrace.from_arrays(perm[t.expert_ids], t.weights, layers=t.layers, num_experts=e,
                                          doc_ids=t.doc_ids, labels={"lang": np.char.add("x", t.labels["lang"])})
    other = mr.metrics.label_nmi(relabelled, "lang", n_shuffles=2)
    assert np.allclose(base.nmi, other.nmi)


# ---------------------------------------------------------------------------------------------- vocabulary
def olmoe_vocab(trace: RoutingTrace, li: int, k: int, min_count: int, target: str = "input") -> float:
    """Transcription of OLMoE's print_avg over {token id: list of experts}."""
    st_ = trace.sorted_by_weight()
    id_to_exp: dict[int, list[int]] = defaultdict(list)
    occurrences: Counter = Counter()
    for t in range(trace.num_tokens):
        if target == "input":
            tok = int(trace.token_ids[t])
        else:
            if t + 1 >= trace.num_tokens or trace.doc_ids[t + 1] != trace.doc_ids[t]:
                continue
            tok = int(trace.token_ids[t + 1])
        occurrences[tok] += 1
        id_to_exp[tok].extend(int(x) for x in st_.expert_ids[t, li, :k] if x >= 0)
    probs = []
    for tok, exps in id_to_exp.items():
        if occurrences[tok] >= min_count:
            probs.append(Counter(exps).most_common(1)[0][1] / occurrences[tok])
    return float(np.mean(probs))


@pytest.mark.parametrize(("k", "target"), [(1, "input"), (2, "input"), (1, "next")])
def test_vocabulary_specialization_matches_olmoe(skewed, k, target):
    df = mr.metrics.vocabulary_specialization(skewed, k=k, min_count=10, target=target)
    for li, row in enumerate(df.itertuples()):
        assert row.specialization == pytest.approx(olmoe_vocab(skewed, li, k, 10, target))
        assert row.uniform == pytest.approx(k / skewed.num_experts)
    if target == "input":
        assert (df.specialization > df.floor).all()  # token ids drive routing in the skewed trace
    per = mr.metrics.vocabulary_specialization(skewed, k=k, target=target, per_token=True)
    assert (per.occurrences >= 10).all() and per.specialization.between(0, 1).all()


def test_vocabulary_floor_is_near_the_value_without_dependence():
    t = make_trace(8, n_docs=40, vocab=20)
    df = mr.metrics.vocabulary_specialization(t, min_count=10)
    assert np.allclose(df.specialization, df.floor, atol=0.03)


def test_top_tokens_matches_a_loop(skewed):
    df = mr.metrics.top_tokens(skewed, n=3, tokens=[f"w{i}" for i in range(100)])
    li = 0
    layer = skewed.layers[li]
    per_expert: dict[int, Counter] = defaultdict(Counter)
    for t in range(skewed.num_tokens):
        for x in skewed.expert_ids[t, li]:
            per_expert[int(x)][int(skewed.token_ids[t])] += 1
    for expert, counter in per_expert.items():
        got = df[(df.layer == layer) & (df.expert == expert)].sort_values("rank")
        top = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        assert got.token_id.tolist() == [tok for tok, _ in top]
        assert got["count"].tolist() == [c for _, c in top]
        assert got.token.tolist() == [f"w{tok}" for tok, _ in top]
        assert np.allclose(got.expert_share, got["count"] / sum(counter.values()))


# ---------------------------------------------------------------------------------------------- token types
@pytest.mark.parametrize(
    ("text", "kind"),
    [("123", "digit"), ("٣", "digit"), (",", "punctuation"), ("...", "punctuation"), ("$", "punctuation"),
     (" ", "whitespace"), ("\n\n", "whitespace"), ("Ġ", "whitespace"), ("▁", "whitespace"), (" the", "latin"),
     ("Ġthe", "latin"), ("café", "latin"), ("日本", "cjk"), ("カタ", "cjk"), ("한국", "cjk"), ("привет", "other_script"),
     ("مرحبا", "other_script"), ("\ufffd", "other"), ("", "other"), ("a1", "latin"), ("1,5", "other")],
)
def test_token_type(text, kind):
    assert mr.metrics.token_type(text) == kind
    assert kind in mr.metrics.TOKEN_TYPES


def test_token_type_specialization_with_mapping_and_tokenizer_like(skewed):
    vocab = {i: ["7", ",", " ", "word", "字", "слово"][i % 6] for i in range(30)}
    df = mr.metrics.token_type_specialization(skewed, vocab)
    assert set(df.token_type) == {"digit", "punctuation", "whitespace", "latin", "cjk", "other_script"}
    types = np.array([mr.metrics.token_type(vocab[int(t)]) for t in skewed.token_ids])
    ref = mr.metrics.label_usage(skewed.with_labels(token_type=types), "token_type")
    assert np.array_equal(df["count"].to_numpy(), ref["count"].to_numpy())

    class Tok:
        def decode(self, ids):
            return vocab[ids[0]]

    df2 = mr.metrics.token_type_specialization(skewed, Tok())
    assert df2.equals(df)
    nmi = mr.metrics.label_nmi(skewed, mr.metrics.token_type_label(vocab))
    assert (nmi.nmi > nmi.floor).all()


# ---------------------------------------------------------------------------------------------- probe
def test_label_probe_separable_and_random():
    t = make_trace(9, n_docs=40, doc_len=(20, 30), num_experts=8)
    t1 = t.top1()[:, 0]
    easy = t.with_labels(y=np.where(t1 < 4, "low", "high"))
    df = mr.metrics.label_probe(easy, "y", layers=[t.layers[0]], features="top1")
    assert df.accuracy.iloc[0] > 0.97 and df.chance.iloc[0] < 0.75
    rnd = t.with_labels(y=np.random.default_rng(0).choice(["a", "b"], t.num_tokens))
    df = mr.metrics.label_probe(rnd, "y")
    assert (df.balanced_accuracy < 0.6).all() and (df.chance_balanced == 0.5).all()
    assert list(df.layer) == list(t.layers)


# ---------------------------------------------------------------------------------------------- co-activation


def test_label_nmi_bootstrap_interval(skewed):
    df = mr.metrics.label_nmi(skewed, "lang", n_boot=200)
    assert (df.ci_low < df.ci_high).all()
    assert (df.ci_low > df.floor).all()  # the language signal is far above the shuffled floor
    assert ((df.nmi > df.ci_low - 0.02) & (df.nmi < df.ci_high + 0.02)).all()


def test_token_types_with_a_real_byte_level_tokenizer(tokenizer):
    text = "The fox 42, der Fuchs! Быстрая лиса 敏捷的狐狸\n"
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
    n = len(ids)
    rng = np.random.default_rng(0)
    t = RoutingTrace.from_arrays(rng.integers(0, 4, size=(n, 1, 1)), num_experts=4, token_ids=ids)
    label = mr.metrics.token_type_label(tokenizer)
    types = label(t)
    decoded = [tokenizer.decode([int(i)]) for i in ids]
    for s, kind in zip(decoded, types.tolist(), strict=True):
        assert kind == mr.metrics.token_type(s)
    assert {"latin", "digit", "punctuation"} <= set(types.tolist())
    assert set(types.tolist()) <= set(mr.metrics.TOKEN_TYPES)
    df = mr.metrics.top_tokens(t, n=2, tokens=tokenizer)
    assert df.token.map(type).eq(str).all()


def test_vocabulary_per_token_top_expert(skewed):
    per = mr.metrics.vocabulary_specialization(skewed, per_token=True, min_count=1)
    t1 = skewed.top1()
    for row in per.sample(25, random_state=0).itertuples():
        li = skewed.layer_index(row.layer)
        c = np.bincount(t1[skewed.token_ids == row.token_id, li], minlength=skewed.num_experts)
        assert row.top_expert == int(np.argmax(c)) and row.occurrences == c.sum()
        assert row.specialization == pytest.approx(c.max() / c.sum())


# ---------------------------------------------------------------------------------------------- issue 14, item 10


def test_domain_specialization_token_share_has_its_baseline(skewed):
    """token_share of uniformly spread routing is k/E: the frame carries that line as token_share_uniform."""
    df = mr.metrics.domain_specialization(skewed, "domain")
    assert (df.token_share_uniform == skewed.top_k / skewed.num_experts).all()
    # the baseline is the mean of token_share over experts when every token has k distinct experts
    assert np.allclose(df.groupby(["domain", "layer"]).token_share.mean(), df.token_share_uniform.iloc[0])
    top1 = mr.metrics.domain_specialization(skewed, "domain", k=1)
    assert (top1.token_share_uniform == 1 / skewed.num_experts).all()


def test_vocabulary_specialization_olmoe_preset_has_no_occurrence_filter(skewed):
    """preset="olmoe" = OLMoE's per-layer figure function (every token id); the default keeps ids seen >= 10 times."""
    default = mr.metrics.vocabulary_specialization(skewed)
    olmoe = mr.metrics.vocabulary_specialization(skewed, preset="olmoe")
    for li, (d, o) in enumerate(zip(default.itertuples(), olmoe.itertuples(), strict=True)):
        assert d.specialization == pytest.approx(olmoe_vocab(skewed, li, 1, 10, "input"))
        assert o.specialization == pytest.approx(olmoe_vocab(skewed, li, 1, 1, "input"))
    explicit = mr.metrics.vocabulary_specialization(skewed, preset="olmoe", min_count=10)
    assert np.allclose(explicit.specialization, default.specialization)
    with pytest.raises(mr.errors.MetricError, match="preset"):
        mr.metrics.vocabulary_specialization(skewed, preset="paper")


def test_vocabulary_presets_differ_where_rare_tokens_exist():
    t = make_trace(3, n_docs=60, vocab=300)  # some token ids seen >= 10 times, many only a few times
    default = mr.metrics.vocabulary_specialization(t, n_sim=0)
    olmoe = mr.metrics.vocabulary_specialization(t, preset="olmoe", n_sim=0)
    print("vocabulary specialization default vs olmoe:", default.specialization.round(3).tolist(),
          olmoe.specialization.round(3).tolist())
    assert (olmoe.token_ids > default.token_ids).all()
    assert (olmoe.specialization > default.specialization).all()


