"""Count primitives against loops."""

from __future__ import annotations

import numpy as np

from moe_routing.metrics import _counts as M


def test_counts_primitives_against_loops():
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 5, size=(300, 3, 2)).astype(np.int16)
    c = M.layer_expert_counts(ids, 5)
    for li in range(3):
        x = ids[:, li].ravel()
        assert np.array_equal(c[li], np.bincount(x[x >= 0], minlength=5))
    codes = rng.integers(0, 4, size=300)
    g = M.grouped_counts(codes, 4, ids, 5)
    for v in range(4):
        assert np.array_equal(g[v], M.layer_expert_counts(ids[codes == v], 5))


def test_weighted_counts_against_a_loop():
    rng = np.random.default_rng(1)
    ids = rng.integers(-1, 5, size=(200, 2, 3)).astype(np.int16)
    w = rng.random(ids.shape).astype(np.float32)
    w[0, 0, 0] = np.nan
    codes = rng.integers(0, 3, size=200)
    got = M.weighted_counts(ids, w, 5, codes, 3)
    ref = np.zeros((3, 2, 5))
    for t, layer, s in np.ndindex(*ids.shape):
        if ids[t, layer, s] >= 0 and not np.isnan(w[t, layer, s]):
            ref[codes[t], layer, ids[t, layer, s]] += w[t, layer, s]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
