"""Statistics of count tables: permutation tables, the one softmax, the JS shuffled floor."""

from __future__ import annotations

import numpy as np
import pytest

from moe_routing.metrics import _stats as M


def test_permutation_tables_keep_margins():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 30, size=(4, 7))
    for _ in range(10):
        p = M.permutation_tables(t, rng)
        assert np.array_equal(p.sum(axis=0), t.sum(axis=0)) and np.array_equal(p.sum(axis=1), t.sum(axis=1))

@pytest.mark.parametrize(("e", "m", "expect"), [(8, 2, 1 - (6 / 8) * (5 / 7)), (8, 5, 1.0), (8, 1, 1 / 8)])
def test_random_pair_overlap(e, m, expect):
    assert M.random_pair_overlap(e, m) == pytest.approx(expect)


def test_softmax_nan_counts_as_minus_inf_and_an_empty_row_is_nan():
    x = np.array([[1.0, np.nan, 1.0], [np.nan, np.nan, np.nan], [0.0, 1.0, 2.0]], dtype=np.float16)
    p = M.softmax(x)
    np.testing.assert_allclose(p[0], [0.5, 0.0, 0.5])
    assert np.isnan(p[1]).all()
    np.testing.assert_allclose(p[2], np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum())
    assert M.softmax(x, dtype=np.float32).dtype == np.float32


def test_shuffled_pair_tables_keep_margins_and_match_permutation_tables_in_distribution():
    rng = np.random.default_rng(0)
    a, b = np.array([30, 5, 0, 10]), np.array([3, 20, 7, 1])
    xs = np.array([M.shuffled_pair_tables(a, b, rng)[0] for _ in range(4000)])
    ys = np.array([M.permutation_tables(np.stack([a, b]), rng)[0] for _ in range(4000)])
    assert (xs.sum(axis=1) == a.sum()).all() and (xs <= a + b).all() and (xs >= 0).all()
    np.testing.assert_allclose(xs.mean(axis=0), ys.mean(axis=0), atol=0.25)
    np.testing.assert_allclose(xs.var(axis=0), ys.var(axis=0), rtol=0.15, atol=0.1)


def test_js_floor_is_positive_and_nan_without_shuffles():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 40, size=(2, 6))
    b = rng.integers(0, 40, size=(2, 6))
    f = M.js_floor(a, b, 50, np.random.default_rng(0))
    assert f.shape == (2,) and (f > 0).all()
    assert np.isnan(M.js_floor(a, b, 0, rng)).all()
