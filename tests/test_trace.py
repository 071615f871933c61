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
