import json

import duckdb
import numpy as np
import polars as pl
import pytest

import moe_routing as mr
from moe_routing.errors import CorruptShardError, TraceError
from moe_routing.store import TraceReader
from moe_routing.trace import RoutingTrace
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


def _two_shard_trace(path, seed=0):
    t = random_trace(seed=seed)
    t.save(path, tokens_per_shard=100)
    assert len(TraceReader(path).shards()) == 2
    return t


def test_deleted_shard_is_named_and_never_read_as_complete(tmp_path):
    from moe_routing.errors import MissingShardError

    t = _two_shard_trace(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_shards"] == 2 and sum(r["tokens"] for r in manifest["shards"].values()) == len(t)
    (tmp_path / "shards" / "part-000001.parquet").unlink()
    reader = TraceReader(tmp_path)
    assert not reader.complete and reader.missing_shards == ["part-000001.parquet"]
    with pytest.raises(MissingShardError, match="part-000001"):
        reader.read()
    with pytest.raises(MissingShardError, match="part-000001"):  # streaming reads too
        list(reader.iter_traces())
    with pytest.raises(MissingShardError, match="part-000001"):  # and every metric given the directory
        mr.metrics.expert_load(tmp_path)
    with pytest.warns(UserWarning, match="part-000001"):
        back = TraceReader(tmp_path, skip_corrupt=True).read()
    assert back.equals(t.select(np.arange(100)))


def test_shard_copied_from_another_run_is_refused(tmp_path):
    from moe_routing.errors import ForeignShardError

    t = _two_shard_trace(tmp_path / "a", seed=0)
    _two_shard_trace(tmp_path / "b", seed=1)  # same layout, other tokens
    (tmp_path / "a" / "shards" / "part-000001.parquet").write_bytes(
        (tmp_path / "b" / "shards" / "part-000001.parquet").read_bytes()
    )
    with pytest.raises(ForeignShardError, match="part-000001"):
        TraceReader(tmp_path / "a").read()
    assert [type(e) for e in TraceReader(tmp_path / "a").verify()] == [ForeignShardError]
    with pytest.warns(UserWarning, match="part-000001"):
        back = TraceReader(tmp_path / "a", skip_corrupt=True).read()
    assert back.equals(t.select(np.arange(100)))
    # a shard the manifest does not list at all
    (tmp_path / "b" / "shards" / "part-000007.parquet").write_bytes(
        (tmp_path / "a" / "shards" / "part-000000.parquet").read_bytes()
    )
    with pytest.raises(ForeignShardError, match=r"part-000007.*not one of the 2 shards"):
        TraceReader(tmp_path / "b").read()


def test_streaming_an_incomplete_directory_warns(tmp_path):
    _two_shard_trace(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["complete"] = False
    del m["shards"], m["num_shards"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="incomplete"):
        assert len(list(TraceReader(tmp_path).iter_traces())) == 2
    with pytest.warns(UserWarning, match="incomplete"):
        mr.metrics.expert_load(tmp_path)


def test_write_trace_never_deletes_shards_it_was_not_asked_to_replace(tmp_path):
    stray = tmp_path / "shards" / "part-000000.parquet"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"someone else's data")
    with pytest.raises(TraceError, match=r"no manifest\.json.*overwrite=True"):
        random_trace().save(tmp_path)
    assert stray.read_bytes() == b"someone else's data"
    random_trace().save(tmp_path, overwrite=True)
    assert TraceReader(tmp_path).read().equals(random_trace())


def test_duckdb_view_name_is_validated_and_quoted(tmp_path):
    t = random_trace()
    t.save(tmp_path)
    with pytest.raises(TraceError, match="not a plain SQL identifier"):
        TraceReader(tmp_path).duckdb(view="t as select 1; drop table x; --")
    con = TraceReader(tmp_path).duckdb(view="select")  # a reserved word works once quoted
    assert con.sql('select count(*) from "select"').fetchall()[0][0] == len(t)


def test_more_than_32767_experts_round_trip_as_int32(tmp_path):
    ids = np.array([[[65535, 69999]], [[0, -1]], [[32768, 12]]])
    t = mr.RoutingTrace.from_arrays(ids, np.ones((3, 1, 2)), num_experts=70_000)
    t.save(tmp_path)
    back = mr.RoutingTrace.load(tmp_path)
    assert back.expert_ids.dtype == np.int32 and back.expert_ids.tolist() == ids.tolist()


def test_a_locked_directory_is_refused_with_the_lock_named(tmp_path):
    from moe_routing.errors import TraceLockedError
    from moe_routing.store import DirectoryLock

    with DirectoryLock(tmp_path, purpose="test"):
        with pytest.raises(TraceLockedError, match=r"process \d+ .*test.*\.moe-routing\.lock.*another directory"):
            random_trace().save(tmp_path, overwrite=True)
        assert not (tmp_path / "manifest.json").exists()
    random_trace().save(tmp_path)  # released: the next writer gets in


def test_documents_are_read_from_their_row_groups_only(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from moe_routing import store

    monkeypatch.setattr(store, "ROW_GROUP_BYTES", 2_000)  # many row groups in a small trace
    rng = np.random.default_rng(0)
    n = 3_000
    docs = np.repeat(np.arange(60), 50)
    t = RoutingTrace.from_arrays(rng.integers(0, 8, (n, 3, 2)), rng.random((n, 3, 2), dtype=np.float32),
                                 num_experts=8, doc_ids=docs, labels={"lang": np.array(["de", "fr"] * (n // 2))})
    path = t.save(tmp_path / "t", tokens_per_shard=1_000)
    reader = mr.open_trace(path)
    groups = [pq.ParquetFile(p).num_row_groups for p in reader.shards()]
    assert len(groups) == 3 and min(groups) > 5
    index = reader.document_index()
    assert index is not None and index.num_rows == 60
    want = [3, 31, 59]
    got = reader.read_documents(want)
    assert got.equals(t.select(np.isin(t.doc_ids, want)))
    # an index left by another run is never trusted: the reader falls back to row-group statistics
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * 16
    (path / "manifest.json").write_text(json.dumps(manifest))
    other = mr.open_trace(path, skip_corrupt=True)
    assert other.document_index() is None


def test_write_trace_weights_dtype(tmp_path):
    rng = np.random.default_rng(1)
    exact16 = rng.random((40, 2, 2)).astype(np.float16).astype(np.float32)  # values a 16-bit model computed
    t = RoutingTrace.from_arrays(rng.integers(0, 4, (40, 2, 2)), exact16, num_experts=4)
    auto = RoutingTrace.load(t.save(tmp_path / "a", weights_dtype="auto"))
    assert np.array_equal(auto.weights, t.weights)
    wide = rng.random((40, 2, 2), dtype=np.float32)  # not 16-bit values: auto keeps float32 (lossless)
    t2 = RoutingTrace.from_arrays(t.expert_ids, wide, num_experts=4)
    assert np.array_equal(RoutingTrace.load(t2.save(tmp_path / "b", weights_dtype="auto")).weights, wide)
    half = RoutingTrace.load(t2.save(tmp_path / "c", weights_dtype="float16")).weights
    assert np.array_equal(half, wide.astype(np.float16).astype(np.float32))
    with pytest.raises(mr.TraceError, match="weights_dtype"):
        t2.save(tmp_path / "d", weights_dtype="int8")
