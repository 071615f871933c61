import numpy as np
import pytest

import moe_routing as mr
from moe_routing.errors import TraceError


def random_trace(n=200, layers=(1, 3, 4), k=2, e=8, seed=0, logits=False):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in layers]) for _ in range(n)])
    w = rng.random((n, len(layers), k)).astype(np.float32)
    return mr.RoutingTrace.from_arrays(
        ids, w, layers=layers, num_experts=e, labels={"lang": np.array(["de", "en"])[rng.integers(0, 2, n)]},
        token_ids=rng.integers(0, 50, n), doc_ids=np.repeat(np.arange(n // 10), 10),
        router_logits=rng.normal(size=(n, len(layers), e)) if logits else None,
    )


def test_shapes_and_dtypes():
    t = random_trace()
    assert t.expert_ids.dtype == np.int16 and t.expert_ids.shape == (200, 3, 2)
    assert t.weights.dtype == np.float32 and t.weights.shape == (200, 3, 2)
    assert t.layers == (1, 3, 4) and t.top_k == 2 and t.num_experts == 8
    assert t.positions[:12].tolist() == [*range(10), 0, 1]


def test_top1_is_largest_weight_slot():
    ids = np.array([[[3, 5]], [[2, 7]]])
    w = np.array([[[0.2, 0.8]], [[0.6, 0.4]]])
    t = mr.RoutingTrace.from_arrays(ids, w, num_experts=8)
    assert t.top1()[:, 0].tolist() == [5, 2]
    s = t.sorted_by_weight()
    assert s.expert_ids[:, 0, 0].tolist() == [5, 2]


def test_top1_ignores_empty_slots():
    t = mr.RoutingTrace.from_arrays(np.array([[[-1, 4]]]), np.array([[[0.0, 0.0]]]), num_experts=8)
    assert t.top1()[0, 0] == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"expert_ids": np.zeros((3, 2)), "weights": None}, "3 dimensions"),
        ({"expert_ids": np.full((3, 1, 2), 9), "weights": None}, "outside"),
        ({"expert_ids": np.zeros((3, 1, 2)), "weights": np.zeros((3, 1, 3))}, "does not match"),
        ({"expert_ids": np.zeros((3, 1, 2)), "weights": None, "layers": [0, 1]}, "MoE layers"),
        ({"expert_ids": np.zeros((3, 1, 2)), "weights": None, "labels": {"x": [1, 2]}}, "one value per token"),
    ],
)
def test_bad_arrays_get_clear_errors(kwargs, message):
    with pytest.raises(TraceError, match=message):
        mr.RoutingTrace.from_arrays(kwargs.pop("expert_ids"), kwargs.pop("weights"), num_experts=8, **kwargs)


def test_select_where_and_layer_errors():
    t = random_trace()
    de = t.where(lang="de")
    assert set(de.labels["lang"]) == {"de"} and len(de) == (t.labels["lang"] == "de").sum()
    sub = t.select(layers=[3])
    assert sub.layers == (3,) and np.array_equal(sub.expert_ids[:, 0], t.expert_ids[:, 1])
    with pytest.raises(TraceError, match="not a MoE layer"):
        t.select(layers=[2])
    with pytest.raises(TraceError, match="no label 'domain'"):
        t.label("domain")


def test_concat_and_equals():
    t = random_trace(logits=True)
    a, b = t.select(np.arange(100)), t.select(np.arange(100, 200))
    assert mr.RoutingTrace.concat([a, b]).equals(t)
    other = random_trace(e=16)
    with pytest.raises(TraceError, match="different models"):
        mr.RoutingTrace.concat([t, other])


def test_to_frame_is_tidy():
    t = random_trace(n=20)
    df = t.to_frame()
    assert len(df) == 20 * 3 * 2
    assert {"token", "layer", "slot", "expert", "weight", "lang"} <= set(df.columns)
    row = df.iloc[7]
    j = t.layers.index(row.layer)
    assert t.expert_ids[row.token, j, row.slot] == row.expert


def test_ids_only_import_has_no_weights():
    t = mr.RoutingTrace.from_arrays(np.zeros((4, 2, 2)), None, num_experts=4)
    assert not t.has_weights and np.isnan(t.weights).all()
    assert t.top1().shape == (4, 2)


def test_expert_ids_are_range_checked_before_any_narrowing_cast():
    # 40000 does not fit int16: it must be reported as itself, not as a wrapped negative id
    with pytest.raises(TraceError, match=r"\[0, 40000\].*num_experts=8"):
        mr.RoutingTrace.from_arrays(np.array([[[0, 40000]]]), None, num_experts=8)
    # more than 32,767 experts: the ids widen to int32 and survive intact (65535 is not -1)
    ids = np.array([[[65535, 69999]], [[0, 32768]]])
    t = mr.RoutingTrace.from_arrays(ids, np.ones((2, 1, 2)), num_experts=70_000)
    assert t.expert_ids.dtype == np.int32
    assert t.expert_ids.tolist() == ids.tolist()
    assert mr.RoutingTrace.from_arrays(ids % 8, None, num_experts=8).expert_ids.dtype == np.int16


def test_negative_layer_indices_are_refused_at_construction():
    with pytest.raises(TraceError, match="layers must be decoder-layer indices >= 0"):
        mr.RoutingTrace.from_arrays(np.zeros((3, 2, 1)), None, layers=[-1, 2], num_experts=4)


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_missing_label_values_are_refused_never_stored_as_text(missing):
    labels = {"lang": ["de", missing, "en"]}
    with pytest.raises(TraceError, match=r"label 'lang' has 1 missing values.*index 1"):
        mr.RoutingTrace.from_arrays(np.zeros((3, 1, 1)), None, num_experts=4, labels=labels)
    t = mr.RoutingTrace.from_arrays(np.zeros((3, 1, 1)), None, num_experts=4)
    with pytest.raises(TraceError, match="missing values"):
        t.with_labels(lang=np.array(["de", missing, "en"], dtype=object))


def test_labels_per_document_or_per_token_are_explicit():
    from moe_routing.trace import expand_label

    # three documents of 2, 1, 3 tokens
    docs = np.array([0, 0, 1, 2, 2, 2])
    t = mr.RoutingTrace.from_arrays(np.zeros((6, 1, 1)), None, num_experts=4, doc_ids=docs,
                                    labels={"lang": ["de", "en", "fr"]}, per="doc")
    assert t.labels["lang"].tolist() == ["de", "de", "en", "fr", "fr", "fr"]
    with pytest.raises(TraceError, match="one value per token"):  # the default is per token, strictly
        mr.RoutingTrace.from_arrays(np.zeros((6, 1, 1)), None, num_experts=4, doc_ids=docs,
                                    labels={"lang": ["de", "en", "fr"]})
    assert t.with_labels(src=["a", "b", "c"], per="doc").labels["src"].tolist() == list("aabccc")
    # two tokens, two documents given in reverse id order: per token and per document disagree
    rev = np.array([1, 0])
    with pytest.raises(TraceError, match="per='token' or per='doc'"):
        expand_label("x", ["a", "b"], rev)
    assert expand_label("x", ["a", "b"], rev, per="token").tolist() == ["a", "b"]
    assert expand_label("x", ["a", "b"], rev, per="doc").tolist() == ["b", "a"]
    # the count decides when only one reading fits
    assert expand_label("x", ["p", "q", "r"], docs).tolist() == list("ppqrrr")
    assert expand_label("x", list("abcdef"), docs).tolist() == list("abcdef")
