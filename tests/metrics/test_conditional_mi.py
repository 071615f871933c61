"""conditional_label_mi: I(label; expert | token) against loops, sklearn by strata, and routers with known answers."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import mutual_info_score

import moe_routing as mr
from moe_routing import MetricError, RoutingTrace

from .conftest import make_trace, split_by_docs, write_sharded


def routed_trace(seed: int, router: str, *, n_docs: int = 60, vocab: int = 25, num_experts: int = 8,
                 langs: tuple[str, ...] = ("en", "de", "fr"), top_k: int = 2, table_seed: int | None = None,
                 noise: float = 0.0) -> RoutingTrace:
    """Languages sharing one vocabulary; first-choice expert from ``router``:

    ``"token"``: a fixed function of the token id; ``"token+lang"``: of the token id and the language;
    ``"random"``: independent of both. The second slot is a random other expert with a smaller weight.
    ``table_seed`` fixes the token -> expert table across samples; ``noise``: share of first choices redrawn
    at random.
    """
    rng = np.random.default_rng(seed)
    lens = rng.integers(10, 30, size=n_docs)
    n = int(lens.sum())
    lang_code = np.repeat(np.arange(n_docs) % len(langs), lens)
    # languages prefer different parts of the shared vocabulary, so the token tells something about the language
    own = (lang_code * (vocab // len(langs)) + rng.integers(0, vocab // len(langs), size=n)) % vocab
    tok = np.where(rng.random(n) < 0.5, own, rng.integers(0, vocab, size=n))
    table = np.random.default_rng(table_seed).integers(0, num_experts, size=vocab) if table_seed is not None \
        else rng.integers(0, num_experts, size=vocab)
    if router == "token":
        first = table[tok]
    elif router == "token+lang":
        first = (table[tok] + lang_code) % num_experts
    else:
        first = rng.integers(0, num_experts, size=n)
    if noise:
        first = np.where(rng.random(n) < noise, rng.integers(0, num_experts, size=n), first)
    n_layers = 2
    first = np.stack([first, (first + 1) % num_experts], axis=1)  # layer 1 a relabelling of layer 0
    second = (first + rng.integers(1, num_experts, size=first.shape)) % num_experts
    ids = np.stack([second, first], axis=2).astype(np.int16)  # first choice in slot 1: top-1 must use weights
    w = np.stack([np.full(first.shape, 0.3), np.full(first.shape, 0.7)], axis=2).astype(np.float32)
    assert ids.shape == (n, n_layers, top_k)
    return RoutingTrace.from_arrays(
        ids, w, layers=(0, 2), num_experts=num_experts,
        labels={"lang": np.array(langs)[lang_code]}, token_ids=tok.astype(np.int32),
        doc_ids=np.repeat(np.arange(n_docs) * 5 + 1, lens),
    )


def brute_force(trace: RoutingTrace, li: int, min_labels: int = 2, expert: np.ndarray | None = None
                ) -> dict[str, float]:
    """Explicit loops over strata: dictionaries of counts, the textbook formula (expert: top-1 by default)."""
    lab = trace.labels["lang"].tolist()
    tok = trace.token_ids.tolist()
    top = (trace.top1()[:, li] if expert is None else expert).tolist()
    labels_of = defaultdict(set)
    for t, lv in zip(tok, lab, strict=True):
        labels_of[t].add(lv)
    kept = [i for i in range(len(tok)) if len(labels_of[tok[i]]) >= min_labels and top[i] >= 0]
    n = len(kept)
    cmi = 0.0
    for t in sorted({tok[i] for i in kept}):
        members = [i for i in kept if tok[i] == t]
        nt = len(members)
        c_lx = Counter((lab[i], top[i]) for i in members)
        c_l = Counter(lab[i] for i in members)
        c_x = Counter(top[i] for i in members)
        mi_t = 0.0
        for (lv, xv), c in c_lx.items():
            mi_t += c / nt * math.log(c * nt / (c_l[lv] * c_x[xv]))
        cmi += nt / n * mi_t
    return {"cmi_bits": cmi / math.log(2), "n_tokens": n, "n_token_ids": len({tok[i] for i in kept}),
            "kept": kept}


def sklearn_by_strata(trace: RoutingTrace, li: int) -> float:
    """sum_t p(t) * mutual_info_score(labels | t, experts | t), in bits."""
    lab = trace.labels["lang"]
    tok = trace.token_ids
    top = trace.top1()[:, li]
    shared = [t for t in np.unique(tok) if len(np.unique(lab[tok == t])) >= 2]
    n = sum(int((tok == t).sum()) for t in shared)
    return sum((tok == t).sum() / n * mutual_info_score(lab[tok == t], top[tok == t]) for t in shared) / math.log(2)


@pytest.mark.parametrize("router", ["token", "token+lang", "random"])
def test_matches_brute_force_and_sklearn(router):
    t = routed_trace(3, router)
    df = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=0, n_boot=0)
    assert df["layer"].tolist() == [0, 2]
    for li, row in enumerate(df.itertuples()):
        ref = brute_force(t, li)
        assert row.cmi_bits == pytest.approx(ref["cmi_bits"], abs=1e-10)
        assert row.cmi_bits == pytest.approx(sklearn_by_strata(t, li), abs=1e-10)
        assert row.n_tokens == ref["n_tokens"]
        assert row.n_token_ids == ref["n_token_ids"]
        kept = ref["kept"]
        lab, tok, top = t.labels["lang"][kept], t.token_ids[kept], t.top1()[kept, li]
        assert row.mi_label_token_bits == pytest.approx(mutual_info_score(lab, tok) / math.log(2), abs=1e-10)
        assert row.mi_label_expert_bits == pytest.approx(mutual_info_score(lab, top) / math.log(2), abs=1e-10)
        # chain rule: I(L; T, X) = I(L; T) + I(L; X | T)
        joint = tok.astype(np.int64) * 100 + top
        assert mutual_info_score(lab, joint) / math.log(2) == pytest.approx(
            row.mi_label_token_bits + row.cmi_bits, abs=1e-10)


def test_brute_force_on_a_random_trace_with_empty_slots():
    t = make_trace(4, n_docs=40, vocab=12, empty_frac=0.2, top_k=1)
    df = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=0, n_boot=0)
    for li, row in enumerate(df.itertuples()):
        ref = brute_force(t, li)
        assert row.cmi_bits == pytest.approx(ref["cmi_bits"], abs=1e-10)
        assert row.n_tokens == ref["n_tokens"]
        assert row.n_tokens < row.n_tokens_total + 1
        assert row.n_tokens_total == int((t.top1()[:, li] >= 0).sum())


def test_token_table_router_has_no_information_beyond_the_token():
    t = routed_trace(5, "token")
    df = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=10, n_boot=50)
    assert (df["cmi_bits"] <= df["floor_bits"] + 1e-9).all()
    assert (df["cmi_bits"].abs() < 1e-9).all()  # a function of the token: zero in every stratum
    assert (df["mi_label_expert_bits"] > 0.05).all()  # ... although the expert does "know" the language
    assert (df["mi_label_token_bits"] > df["mi_label_expert_bits"] - 1e-9).all()  # data processing


def test_label_dependent_router_is_clearly_above_the_floor():
    t = routed_trace(6, "token+lang")
    df = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=10, n_boot=50)
    assert (df["cmi_bits"] > df["floor_bits"] + 10 * df["floor_sd_bits"]).all()
    assert (df["ci_low"] > df["floor_bits"]).all()
    assert (df["ci_low"] <= df["cmi_bits"]).all() and (df["cmi_bits"] <= df["ci_high"]).all()
    assert (df["ci_unit"] == "documents").all()
    # the first choice is a bijection of the language within a token: cmi = H(label | token)
    assert (df["cmi_bits"] > 0.8 * (df["h_label_bits"] - df["mi_label_token_bits"])).all()


def test_floor_is_a_within_token_label_permutation():
    t = routed_trace(7, "random", n_docs=30)
    n_shuffles = 200
    df = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=n_shuffles, n_boot=0, seed=1)
    rng = np.random.default_rng(123)
    lab, tok = t.labels["lang"], t.token_ids
    for li, row in enumerate(df.itertuples()):
        ref = brute_force(t, li)
        kept = np.asarray(ref["kept"])
        draws = []
        for _ in range(n_shuffles):
            shuffled = lab.copy()
            for v in np.unique(tok[kept]):  # a loop over strata: permute the labels of one token id
                members = kept[tok[kept] == v]
                shuffled[members] = rng.permutation(lab[members])
            draws.append(brute_force(t.with_labels(lang=shuffled), li)["cmi_bits"])
        se = np.std(draws) * math.sqrt(2 / n_shuffles)
        assert row.floor_bits == pytest.approx(np.mean(draws), abs=5 * se)
        assert row.floor_sd_bits == pytest.approx(np.std(draws), rel=0.35)
        assert row.floor_bits > 0  # plug-in bias: shuffled labels still give a positive estimate


def test_streamed_sources_agree_and_results_are_seeded(tmp_path):
    t = routed_trace(8, "token+lang", n_docs=24)
    ref = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=3, n_boot=20, seed=4)
    for source in (split_by_docs(t, 3), write_sharded(t, tmp_path / "t", 3)):
        df = mr.metrics.conditional_label_mi(source, "lang", n_shuffles=3, n_boot=20, seed=4)
        np.testing.assert_allclose(df.drop(columns="ci_unit").to_numpy(float),
                                   ref.drop(columns="ci_unit").to_numpy(float), rtol=1e-10)
    other = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=3, n_boot=20, seed=5)
    assert not np.allclose(other["floor_bits"], ref["floor_bits"])


def test_layers_expert_variable_and_given_label():
    t = routed_trace(9, "token+lang")
    one = mr.metrics.conditional_label_mi(t, "lang", layers=[2], n_shuffles=0, n_boot=0)
    assert one["layer"].tolist() == [2]
    assert one["cmi_bits"].iloc[0] == pytest.approx(brute_force(t, 1)["cmi_bits"])
    # slot 0 holds the weaker, random second choice here: much less information than the first choice
    slot0 = mr.metrics.conditional_label_mi(t, "lang", expert="slot0", n_shuffles=0, n_boot=0)
    top = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=0, n_boot=0)
    assert (slot0["cmi_bits"] < top["cmi_bits"]).all()
    both = mr.metrics.conditional_label_mi(t, "lang", expert="set", n_shuffles=0, n_boot=0)
    for li, row in enumerate(both.itertuples()):
        pair = np.sort(t.expert_ids[:, li].astype(np.int64), axis=1)
        assert row.cmi_bits == pytest.approx(brute_force(t, li, expert=pair[:, 0] * 100 + pair[:, 1])["cmi_bits"])
    # conditioning on a label that is constant: the plain I(label; expert) over all tokens
    const = mr.metrics.conditional_label_mi(t.with_labels(c=np.zeros(t.num_tokens)), "lang", given="c",
                                            n_shuffles=0, n_boot=0)
    assert const["cmi_bits"].to_numpy() == pytest.approx(const["mi_label_expert_bits"].to_numpy())
    assert (const["mi_label_token_bits"] == 0).all()


def test_single_document_bootstraps_tokens():
    t = routed_trace(10, "token+lang")
    single = RoutingTrace.from_arrays(t.expert_ids, t.weights, layers=t.layers, num_experts=t.num_experts,
                                      labels=t.labels, token_ids=t.token_ids)
    df = mr.metrics.conditional_label_mi(single, "lang", n_shuffles=0, n_boot=30)
    assert (df["ci_unit"] == "tokens").all()
    assert (df["ci_low"] < df["ci_high"]).all()


def test_min_labels_keeps_fewer_strata():
    t = routed_trace(11, "token+lang")
    two = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=0, n_boot=0)
    three = mr.metrics.conditional_label_mi(t, "lang", min_labels=3, n_shuffles=0, n_boot=0)
    assert (three["n_token_ids"] <= two["n_token_ids"]).all()
    assert (three["n_tokens"] <= two["n_tokens"]).all()


def test_errors():
    t = routed_trace(12, "token")
    with pytest.raises(MetricError, match="min_labels"):
        mr.metrics.conditional_label_mi(t, "lang", min_labels=1)
    with pytest.raises(MetricError, match="expert must be"):
        mr.metrics.conditional_label_mi(t, "lang", expert="second")
    no_ids = RoutingTrace.from_arrays(t.expert_ids, t.weights, layers=t.layers, num_experts=t.num_experts,
                                      labels=t.labels)
    with pytest.raises(MetricError, match="token id"):
        mr.metrics.conditional_label_mi(no_ids, "lang")
    with pytest.raises(Exception, match="label"):
        mr.metrics.conditional_label_mi(t, "nope")
    with pytest.raises(MetricError, match="ci"):
        mr.metrics.conditional_label_mi(t, "lang", ci=1.5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 15), e=st.integers(2, 9))
def test_bounds_and_relabelling(seed, vocab, e):
    t = make_trace(seed, n_docs=15, vocab=vocab, num_experts=e, top_k=min(2, e), skew=1.0)
    df = mr.metrics.conditional_label_mi(t, "lang", n_shuffles=0, n_boot=0)
    assert (df["cmi_bits"] >= 0).all()
    assert (df["cmi_bits"] <= df["h_label_bits"] - df["mi_label_token_bits"] + 1e-9).all()  # <= H(L | T)
    # renaming experts, labels and token ids changes nothing
    perm = np.random.default_rng(seed).permutation(e)
    ids = np.where(t.expert_ids >= 0, perm[np.maximum(t.expert_ids, 0)], -1)
    renamed = RoutingTrace.from_arrays(
        ids, t.weights, layers=t.layers, num_experts=e, token_ids=(t.token_ids * 7 + 3).astype(np.int32),
        labels={"lang": np.char.add("x", t.labels["lang"].astype(str))}, doc_ids=t.doc_ids)
    df2 = mr.metrics.conditional_label_mi(renamed, "lang", n_shuffles=0, n_boot=0)
    np.testing.assert_allclose(df2["cmi_bits"], df["cmi_bits"], atol=1e-10)


@pytest.mark.parametrize("e", [8, 70])  # 70 experts: more than the bits of an int64 mask
def test_expert_set_variable(e):
    t = routed_trace(13, "token+lang", num_experts=e)
    df = mr.metrics.conditional_label_mi(t, "lang", expert="set", n_shuffles=0, n_boot=0)
    for li, row in enumerate(df.itertuples()):
        pair = np.sort(t.expert_ids[:, li].astype(np.int64), axis=1)
        assert row.cmi_bits == pytest.approx(brute_force(t, li, expert=pair[:, 0] * 1000 + pair[:, 1])["cmi_bits"])


def test_bootstrap_interval_is_centred_and_as_wide_as_the_sampling_spread():
    """Independent samples of one routing process: their spread of cmi_bits is what the interval must show."""
    kw = {"router": "token+lang", "table_seed": 99, "noise": 0.6, "n_docs": 80, "vocab": 40}
    samples = [mr.metrics.conditional_label_mi(routed_trace(s, **kw), "lang", layers=[0], n_shuffles=0,
                                               n_boot=0)["cmi_bits"].iloc[0] for s in range(40)]
    one = mr.metrics.conditional_label_mi(routed_trace(1000, **kw), "lang", layers=[0], n_shuffles=4,
                                          n_boot=300)
    row = one.iloc[0]
    assert row.ci_low <= row.cmi_bits <= row.ci_high  # centred: resampling bias does not push it off
    width = row.ci_high - row.ci_low
    assert 0.5 < width / (2 * 1.96 * np.std(samples)) < 2.0
    assert row.excess_bits == pytest.approx(row.cmi_bits - row.floor_bits)
