"""The deprecated ``metrics._common`` keeps every name it had, as the modules of one concern define them."""

from __future__ import annotations

from moe_routing.metrics import _bootstrap, _common, _counts, _ranking, _source, _stats


def test_common_reexports_the_modules_names():
    for name in _common.__all__:
        obj = getattr(_common, name)
        homes = [m for m in (_source, _ranking, _counts, _stats, _bootstrap) if getattr(m, name, None) is obj]
        assert homes or name == "_rank_keys", name
    assert _common._rank_keys is _ranking.rank_keys
    for name in ("top1", "top2", "sorted_ids", "topk_ids", "layer_expert_counts", "grouped_counts", "hash_uniform",
                 "poisson_weights", "permutation_tables", "random_pair_overlap", "read_all", "chunks", "_sort_key",
                 "factorize", "quantiles"):
        assert hasattr(_common, name), name
