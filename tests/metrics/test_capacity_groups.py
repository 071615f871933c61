"""capacity_drop groupings: per document, per batch of documents, per n tokens, against Python queue loops."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

import moe_routing as mr
from moe_routing import MetricError, RoutingTrace

from .conftest import make_trace, split_by_docs, write_sharded


def queue_sim(trace: RoutingTrace, groups: list[np.ndarray], c: float, priority: str = "slot"
              ) -> dict[int, tuple[int, int, int]]:
    """Per layer (dropped slots, routed slots, tokens with a drop) of explicit queues over the given token groups."""
    e, k = trace.num_experts, trace.top_k
    st_ = trace.sorted_by_weight()
    out = {}
    for li, layer in enumerate(trace.layers):
        dropped = routed = 0
        hit = set()
        for toks in groups:
            cap = max(1, math.floor(c * len(toks) * k / e))
            order = ([(s, t) for s in range(k) for t in toks] if priority == "slot"
                     else [(s, t) for t in toks for s in range(k)])
            fill: Counter = Counter()
            for s, t in order:
                x = int(st_.expert_ids[t, li, s])
                if x < 0:
                    continue
                routed += 1
                if fill[x] >= cap:
                    dropped += 1
                    hit.add(int(t))
                else:
                    fill[x] += 1
        out[layer] = (dropped, routed, len(hit))
    return out


def doc_order(trace: RoutingTrace) -> list[int]:
    seen: dict[int, None] = {}
    for d in trace.doc_ids.tolist():
        seen.setdefault(d, None)
    return list(seen)


def batch_groups(trace: RoutingTrace, batch_size: int) -> list[np.ndarray]:
    docs = doc_order(trace)
    return [np.flatnonzero(np.isin(trace.doc_ids, docs[i:i + batch_size])) for i in range(0, len(docs), batch_size)]


def token_groups(trace: RoutingTrace, n: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + n, trace.num_tokens)) for i in range(0, trace.num_tokens, n)]


def check(df: pd.DataFrame, trace: RoutingTrace, groups: list[np.ndarray], c: float, priority: str):
    for layer, (dropped, routed, tok) in queue_sim(trace, groups, c, priority).items():
        row = df[(df.capacity_factor == c) & (df.layer == layer)].iloc[0]
        assert row.slots == routed
        assert row.drop_rate == pytest.approx(dropped / routed)
        assert row.token_drop_rate == pytest.approx(tok / trace.num_tokens)
        assert row.groups == len(groups)


@pytest.mark.parametrize("priority", ["slot", "token"])
@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_batch_groups_match_queues(priority, batch_size):
    t = make_trace(4, n_docs=11, top_k=2, num_experts=4, empty_frac=0.1, skew=1.0)
    df = mr.metrics.capacity_drop(t, (0.5, 1.0), group="batch", batch_size=batch_size, priority=priority)
    for c in (0.5, 1.0):
        check(df, t, batch_groups(t, batch_size), c, priority)
    assert (df.group == "batch").all()


@pytest.mark.parametrize("n", [7, 64, 10_000])
def test_token_groups_match_queues(n):
    t = make_trace(5, n_docs=9, top_k=2, num_experts=4, skew=1.0)
    df = mr.metrics.capacity_drop(t, (1.0, 1.5), group=n)
    for c in (1.0, 1.5):
        check(df, t, token_groups(t, n), c, "slot")


def test_default_is_per_document_and_batches_of_one_document_agree():
    t = make_trace(6, n_docs=10, top_k=2, num_experts=4, skew=1.0)
    default = mr.metrics.capacity_drop(t, (1.0,))
    docs = [np.flatnonzero(t.doc_ids == d) for d in doc_order(t)]
    check(default, t, docs, 1.0, "slot")
    assert (default.group == "doc").all()
    one = mr.metrics.capacity_drop(t, (1.0,), group="batch", batch_size=1)
    np.testing.assert_allclose(one.drop_rate, default.drop_rate)


@pytest.mark.parametrize("group", ["batch", 50, 13])
def test_streamed_groups_straddling_shards_agree(tmp_path, group):
    t = make_trace(7, n_docs=17, top_k=2, num_experts=4, skew=1.5)
    kw = {"group": group, "batch_size": 4} if group == "batch" else {"group": group}
    ref = mr.metrics.capacity_drop(t, (1.0, 2.0), by_position=True, bins=[0, 8, 16], **kw)
    for source in (split_by_docs(t, 3), write_sharded(t, tmp_path / f"t{group}", 4)):
        df = mr.metrics.capacity_drop(source, (1.0, 2.0), by_position=True, bins=[0, 8, 16], **kw)
        np.testing.assert_allclose(df[["drop_rate", "token_drop_rate", "drop_rate_random"]].to_numpy(),
                                   ref[["drop_rate", "token_drop_rate", "drop_rate_random"]].to_numpy())
        assert (df.groups == ref.groups).all() and (df.slots == ref.slots).all()


def test_mixing_documents_drops_less_for_a_document_specific_router():
    """Each document routes all its tokens to one expert of its own: per document everything beyond the fair
    share drops; in batches of many documents the load evens out."""
    rng = np.random.default_rng(0)
    n_docs, e = 32, 8
    lens = rng.integers(30, 40, size=n_docs)
    expert = np.repeat(np.arange(n_docs) % e, lens)
    ids = expert[:, None, None].astype(np.int16)
    t = RoutingTrace.from_arrays(ids, np.ones(ids.shape, np.float32), num_experts=e,
                                 doc_ids=np.repeat(np.arange(n_docs), lens))
    per_doc = mr.metrics.capacity_drop(t, (1.0,)).drop_rate.iloc[0]
    batched = mr.metrics.capacity_drop(t, (1.0,), group="batch", batch_size=8).drop_rate.iloc[0]
    assert per_doc > 0.8  # 7/8 of each document's slots are beyond the fair share of one expert
    assert batched < 0.1


def test_batch_size_from_a_captured_directory(tmp_path):
    import json

    t = make_trace(8, n_docs=12, top_k=2, num_experts=4, skew=1.0)
    path = t.save(tmp_path / "t")
    with pytest.raises(MetricError, match="batch_size"):
        mr.metrics.capacity_drop(path, group="batch")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["settings"] = {"batch_size": 5}
    (path / "manifest.json").write_text(json.dumps(manifest))
    got = mr.metrics.capacity_drop(path, (1.0,), group="batch")
    want = mr.metrics.capacity_drop(t, (1.0,), group="batch", batch_size=5)
    np.testing.assert_allclose(got.drop_rate, want.drop_rate)


@pytest.mark.parametrize("kw, match", [
    ({"group": "device"}, "group must be"),
    ({"group": 0}, "group must be"),
    ({"group": True}, "group must be"),
    ({"group": 16, "group_size": 8}, "group_size"),
    ({"group": "batch", "batch_size": 0}, "batch_size"),
    ({"batch_size": 4}, "batch_size only"),
    ({"group": "batch"}, "batch_size"),
])
def test_group_errors(kw, match):
    with pytest.raises(MetricError, match=match):
        mr.metrics.capacity_drop(make_trace(0), **kw)
