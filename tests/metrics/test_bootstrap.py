"""Hashing and the Poisson bootstrap: deterministic, uniform, chunk-free."""

from __future__ import annotations

import numpy as np

from moe_routing.metrics import _bootstrap as M


def test_hash_uniform_is_deterministic_and_uniform():
    a = M.hash_uniform(3, np.arange(100_000))
    assert np.array_equal(a, M.hash_uniform(3, np.arange(100_000)))
    assert not np.array_equal(a, M.hash_uniform(4, np.arange(100_000)))
    assert a.min() >= 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.01
    w = M.poisson_weights(0, np.arange(20_000), 3)
    assert w.shape == (3, 20_000) and abs(w.mean() - 1) < 0.03 and abs(w.var() - 1) < 0.05


def test_grouped_counts_boot_is_the_same_in_blocks_and_with_keep():
    """Blocked replicates equal one pass; keeping two values counts exactly their tokens."""
    from .conftest import make_trace

    t = make_trace(4, n_docs=30)
    values, counts, boot, tokens, _ = M.grouped_counts_boot(t, "lang", n_boot=7, seed=2)
    kv, kc, kb, kt, _ = M.grouped_counts_boot(t, "lang", n_boot=7, seed=2, keep=["de", "ja"])
    sel = [values.tolist().index(v) for v in kv.tolist()]
    assert np.array_equal(kc, counts[sel]) and np.array_equal(kb, boot[sel]) and np.array_equal(kt, tokens[sel])
    assert np.array_equal(counts.sum(axis=(1, 2)),
                          [(t.expert_ids[t.labels["lang"] == v] >= 0).sum() for v in values.tolist()])
