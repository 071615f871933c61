import json

import duckdb
import numpy as np
import polars as pl
import pytest

import moe_routing as mr
from moe_routing.errors import CorruptShardError, TraceError
from moe_routing.store import TraceReader
from test_trace import random_trace


def test_round_trip_with_logits(tmp_path):
    t = random_trace(logits=True)
    t.save(tmp_path / "x")
    back = mr.RoutingTrace.load(tmp_path / "x")
    assert back.equals(t)
    assert back.router_logits.dtype == np.float16
    with pytest.raises(TraceError, match="overwrite=True"):
        t.save(tmp_path / "x")


def test_duckdb_polars_pandas_read_the_shards(tmp_path):
    t = random_trace()
    t.save(tmp_path)
    glob = f"{tmp_path}/shards/*.parquet"
    n = duckdb.sql(f"select count(*) from '{glob}' where expert_ids[2][1] = 3").fetchall()[0][0]
    assert n == int((t.expert_ids[:, 1, 0] == 3).sum())
    df = pl.read_parquet(glob)
    assert df["expert_ids"].dtype == pl.Array(pl.Int16, (3, 2))
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "shards")) == len(t)


def test_iter_traces_is_per_shard_and_layers_subset(tmp_path):
    t = random_trace()
    t.save(tmp_path)
    parts = list(TraceReader(tmp_path).iter_traces(layers=[4]))
    assert len(parts) == 1 and parts[0].layers == (4,)


def test_missing_manifest_and_bad_version(tmp_path):
    with pytest.raises(TraceError, match="no manifest\\.json"):
        TraceReader(tmp_path)
    t = random_trace()
    t.save(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match="format version 99"):
        TraceReader(tmp_path)


def test_truncated_shard_is_named_and_skippable(tmp_path):
    t = random_trace()
    t.save(tmp_path, tokens_per_shard=100)
    assert len(TraceReader(tmp_path).shards()) == 2
    shard = tmp_path / "shards" / "part-000000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match="part-000000"):
        TraceReader(tmp_path).read()
    with pytest.warns(UserWarning, match="skipping"):
        back = TraceReader(tmp_path, skip_corrupt=True).read()
    assert back.equals(t.select(np.arange(100, 200)))


def test_shard_of_another_configuration_is_refused(tmp_path):
    random_trace().save(tmp_path / "a")
    random_trace(layers=(0, 1)).save(tmp_path / "b")
    (tmp_path / "a" / "shards" / "part-000001.parquet").write_bytes(
        (tmp_path / "b" / "shards" / "part-000000.parquet").read_bytes()
    )
    with pytest.raises(CorruptShardError, match="mixes two models"):
        TraceReader(tmp_path / "a").read()


def test_duckdb_view_scans_out_of_core_and_agrees_with_the_metrics(tmp_path):
    t = random_trace(n=300)
    t.save(tmp_path)
    con = TraceReader(tmp_path).duckdb()
    rows = con.sql(
        "select l.layer_idx - 1 as j, e as expert, count(*) as n from trace, "
        "unnest(generate_series(1, 3)) as l(layer_idx), unnest(expert_ids[l.layer_idx]) as s(e) "
        "group by all order by all"
    ).fetchall()
    load = mr.metrics.expert_load(t)
    for j, expert, n in rows:
        got = load[(load.layer == t.layers[j]) & (load.expert == expert)]["count"].item()
        assert got == n
    assert sum(n for *_, n in rows) == t.expert_ids.size
