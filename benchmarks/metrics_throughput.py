"""Throughput of moe_routing.metrics against a straightforward pandas groupby implementation of the same numbers.

Prints routing decisions per second (tokens x layers x k) for the load counts and for a suite of metrics, and the
ratio to pandas, in one run:

    .venv/bin/python benchmarks/metrics_throughput.py [--tokens 100000] [--layers 16] [--experts 64] [--k 8]

Single-threaded (BLAS and OpenMP pinned to one thread), so the numbers are per core. The pandas side starts from
the long frame ``trace.to_frame()`` (one row per routing decision), built once and not timed; its build time is
printed separately. Both sides are checked to give the same numbers before timing.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import moe_routing as mr  # noqa: E402

M = mr.metrics


def synthetic(tokens: int, layers: int, experts: int, k: int, seed: int = 0) -> mr.RoutingTrace:
    """Documents of ~512 tokens, Zipf token ids, routing that depends a little on language and token."""
    rng = np.random.default_rng(seed)
    doc_len = 512
    docs = np.arange(tokens) // doc_len
    n_docs = int(docs.max()) + 1
    lang = np.array(["en", "de", "ja", "sw"])[docs % 4]
    domain = np.array(["web", "code", "math", "wiki", "books"])[docs % 5]
    tok = np.minimum(rng.zipf(1.3, size=tokens), 32_000).astype(np.int32)
    scores = rng.gumbel(size=(tokens, layers, experts)).astype(np.float32)
    scores[np.arange(tokens), :, (docs % 4) * 3 % experts] += 1.0
    scores[np.arange(tokens), :, tok % experts] += 0.5
    ids = np.argpartition(-scores, k, axis=2)[:, :, :k]
    w = np.take_along_axis(scores, ids, axis=2)
    w = np.exp(w - w.max(axis=2, keepdims=True))
    w /= w.sum(axis=2, keepdims=True)
    del scores
    return mr.RoutingTrace.from_arrays(ids.astype(np.int16), w.astype(np.float32), num_experts=experts,
                                       layers=list(range(0, 2 * layers, 2)), doc_ids=docs, token_ids=tok,
                                       labels={"lang": lang, "domain": domain}, model_name=f"synthetic-{n_docs}docs")


# ---------------------------------------------------------------------------------------------- pandas baseline
def pd_load(df: pd.DataFrame) -> pd.DataFrame:
    c = df.groupby(["layer", "expert"]).size().rename("count").reset_index()
    c["share"] = c["count"] / c.groupby("layer")["count"].transform("sum")
    return c


def pd_balance(df: pd.DataFrame, experts: int) -> pd.DataFrame:
    c = df.groupby(["layer", "expert"]).size().unstack(fill_value=0).reindex(columns=range(experts), fill_value=0)
    mean = c.mean(axis=1)
    share = c.div(c.sum(axis=1), axis=0)
    ent = -(share * np.log(share.where(share > 0, 1))).sum(axis=1) / np.log(experts)
    return pd.DataFrame({"cv": c.std(axis=1, ddof=0) / mean, "max_over_mean": c.max(axis=1) / mean,
                         "entropy_norm": ent})


def pd_top1(df: pd.DataFrame) -> pd.DataFrame:
    return df.loc[df.groupby(["token", "layer"])["weight"].idxmax()]


def pd_label_usage(df: pd.DataFrame, label: str) -> pd.DataFrame:
    c = df.groupby([label, "layer", "expert"]).size().rename("count").reset_index()
    c["share"] = c["count"] / c.groupby([label, "layer"])["count"].transform("sum")
    return c


def pd_nmi(top1: pd.DataFrame, label: str) -> pd.Series:
    out = {}
    for layer, g in top1.groupby("layer"):
        joint = g.groupby([label, "expert"]).size() / len(g)
        pl = g.groupby(label).size() / len(g)
        pe = g.groupby("expert").size() / len(g)
        mi = (joint * np.log(joint / (pl.reindex(joint.index.get_level_values(0)).to_numpy()
                                      * pe.reindex(joint.index.get_level_values(1)).to_numpy()))).sum()
        out[layer] = mi / -(pl * np.log(pl)).sum()
    return pd.Series(out)


def pd_coactivation(df: pd.DataFrame) -> dict[int, pd.Series]:
    out = {}
    for layer, g in df[["token", "layer", "expert"]].groupby("layer"):
        m = g.merge(g, on="token")
        m = m[m.expert_x != m.expert_y]
        pairs = m.groupby(["expert_x", "expert_y"]).size()
        single = g.groupby("expert").size()
        out[layer] = pairs / single.reindex(pairs.index.get_level_values(0)).to_numpy()
    return out


def pd_consecutive(top1: pd.DataFrame) -> pd.Series:
    t = top1.sort_values(["layer", "token"])
    nxt = t.groupby(["layer", "doc_id"])["expert"].shift(-1)
    same = (t["expert"] == nxt)[nxt.notna()]
    return same.groupby(t.loc[same.index, "layer"]).mean()


def pd_transitions(top1: pd.DataFrame) -> pd.Series:
    wide = top1.pivot(index="token", columns="layer", values="expert")
    cols = list(wide.columns)
    parts = [wide.groupby([cols[i], cols[i + 1]]).size() for i in range(len(cols) - 1)]
    return pd.concat(parts, keys=cols[:-1])


def pd_vocab(top1: pd.DataFrame, min_count: int = 10) -> pd.Series:
    c = top1.groupby(["layer", "token_id", "expert"]).size()
    occ = c.groupby(level=[0, 1]).sum()
    best = c.groupby(level=[0, 1]).max()
    spec = (best / occ)[occ >= min_count]
    return spec.groupby(level=0).mean()


def pandas_suite(df: pd.DataFrame, experts: int) -> dict[str, object]:
    top1 = pd_top1(df)
    return {
        "expert_load": pd_load(df),
        "load_balance": pd_balance(df, experts),
        "label_usage": pd_label_usage(df, "lang"),
        "domain_specialization": pd_label_usage(df, "domain"),
        "label_nmi": pd_nmi(top1, "lang"),
        "coactivation": pd_coactivation(df),
        "consecutive_same_expert": pd_consecutive(top1),
        "transitions": pd_transitions(top1),
        "vocabulary_specialization": pd_vocab(top1),
    }


def ours_suite(trace: mr.RoutingTrace) -> dict[str, object]:
    return {
        "expert_load": M.expert_load(trace),
        "load_balance": M.load_balance(trace),
        "label_usage": M.label_usage(trace, "lang"),
        "domain_specialization": M.domain_specialization(trace),
        "label_nmi": M.label_nmi(trace, "lang", n_shuffles=1, n_boot=0),
        "coactivation": M.coactivation_matrices(trace),
        "consecutive_same_expert": M.consecutive_same_expert(trace, n_boot=0),
        "transitions": M.transitions(trace),
        "vocabulary_specialization": M.vocabulary_specialization(trace, n_sim=0),
    }


def check_same(trace: mr.RoutingTrace, ours: dict, theirs: dict) -> None:
    """The two implementations agree on the numbers that both compute."""
    a = ours["expert_load"].set_index(["layer", "expert"])["count"]
    b = theirs["expert_load"].set_index(["layer", "expert"])["count"]
    assert (a.loc[b.index] == b).all()
    assert np.allclose(ours["load_balance"]["cv"], theirs["load_balance"]["cv"])
    assert np.allclose(ours["label_nmi"]["nmi"], theirs["label_nmi"].to_numpy())
    assert np.allclose(ours["consecutive_same_expert"]["first"], theirs["consecutive_same_expert"].to_numpy())
    assert np.allclose(ours["vocabulary_specialization"]["specialization"],
                       theirs["vocabulary_specialization"].to_numpy())
    layer = trace.layers[0]
    co = theirs["coactivation"][layer]
    mat = ours["coactivation"].sel(layer=layer).values
    assert np.allclose(mat[co.index.get_level_values(0), co.index.get_level_values(1)], co.to_numpy())


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pandas-repeat", type=int, default=1)
    args = ap.parse_args()

    trace = synthetic(args.tokens, args.layers, args.experts, args.k)
    decisions = trace.expert_ids.size
    print(f"trace: {args.tokens:,} tokens x {args.layers} layers x k={args.k} = {decisions:,} decisions, "
          f"{args.experts} experts, one thread")

    t0 = time.perf_counter()
    df = trace.to_frame()
    frame_s = time.perf_counter() - t0
    print(f"pandas long frame built in {frame_s:.2f} s (not counted below)")

    ours, theirs = ours_suite(trace), pandas_suite(df, args.experts)
    check_same(trace, ours, theirs)
    print("check: both implementations give the same numbers")

    load_ours = best_of(lambda: M.expert_load(trace), args.repeat)
    load_pd = best_of(lambda: pd_load(df), args.pandas_repeat)
    suite_ours = best_of(lambda: ours_suite(trace), args.repeat)
    suite_pd = best_of(lambda: pandas_suite(df, args.experts), args.pandas_repeat)

    print()
    print(f"{'':<14}{'ours':>22}{'pandas groupby':>22}{'ratio':>9}")
    for name, a, b in (("load counts", load_ours, load_pd), ("suite", suite_ours, suite_pd)):
        print(f"{name:<14}{decisions / a / 1e6:>12.1f} M dec/s{'':>3}{decisions / b / 1e6:>12.2f} M dec/s"
              f"{'':>3}{b / a:>8.1f}x")
    print(f"(suite = {', '.join(ours)}; times: ours {suite_ours:.2f} s, pandas {suite_pd:.2f} s)")
    print("goals: load counts >= 50 M decisions/s per core; suite >= 20x pandas")


if __name__ == "__main__":
    main()
