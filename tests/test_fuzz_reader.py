"""The trace reader, fuzzed: malformed manifests and shards raise moe_routing's own errors, never crash or hang."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_routing.errors import MoERoutingError
from moe_routing.store import TraceReader
from test_trace import random_trace

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["format", "format_version", "layers", "num_experts", "top_k", "labels", "has_logits", "complete", "meta"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("tmpl")
    random_trace(n=40, logits=True).save(d)
    return d


def _read_all(path):
    try:
        reader = TraceReader(path)
        reader.read()
        for _ in reader.iter_traces():
            pass
    except MoERoutingError:
        pass


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=4),
       drop=st.lists(st.sampled_from(FIELDS), max_size=2))
def test_malformed_manifest(template, tmp_path, changes, drop):
    d = tmp_path / "t"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(template, d)
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    for key in drop:
        m.pop(key, None)
    (d / "manifest.json").write_text(json.dumps(m))
    _read_all(d)


@settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_shard_bytes(template, tmp_path, data):
    d = tmp_path / "s"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(template, d)
    shard = d / "shards" / "part-000000.parquet"
    raw = bytearray(shard.read_bytes())
    mode = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif mode == "flip":
        for _ in range(data.draw(st.integers(1, 20))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=2000)))
    shard.write_bytes(bytes(raw))
    _read_all(d)


@settings(max_examples=60, deadline=2000)
@given(text=st.binary(max_size=300))
def test_manifest_not_json(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("nj")
    (d / "manifest.json").write_bytes(text)
    _read_all(d)
