"""Trace sources: every kind normalised once, reader options kept, columns projected."""

from __future__ import annotations

from moe_routing.metrics import _source as M


def test_metrics_accept_the_reader_that_capture_corpus_returns(tmp_path, qwen3_moe, tokenizer):
    """capture_corpus returns a TraceReader: every metric takes it as it takes the directory's path."""
    import warnings

    import moe_routing as mr
    from moe_routing.pipeline import capture_corpus
    from moe_routing.store import TraceReader

    texts = ["The quick brown fox jumps.", "Der schnelle braune Fuchs.", "Le renard brun saute."] * 4
    reader = capture_corpus(qwen3_moe, tokenizer, texts, tmp_path / "t",
                            labels={"lang": ["en", "de", "fr"] * 4}, progress=False)
    assert isinstance(reader, TraceReader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few tokens per language
        for fn in (lambda t: mr.metrics.expert_load(t), lambda t: mr.metrics.label_nmi(t, "lang"),
                   lambda t: mr.metrics.coactivation_summary(t), lambda t: mr.metrics.transitions(t)):
            got, ref = fn(reader), fn(str(tmp_path / "t"))
            assert got.equals(ref)
    assert mr.metrics.read_all(reader).equals(reader.read())
    assert M.read_all(reader, layers=[reader.layers[0]]).layers == (reader.layers[0],)


def test_projected_chunks_equal_full_ones_on_what_they_read(tmp_path):
    import numpy as np

    from .conftest import make_trace, write_sharded

    t = make_trace(2, logits=True)
    path = write_sharded(t, tmp_path / "t", 3)
    full = list(M.chunks(path))
    part = list(M.chunks(path, columns={"lang"}))
    assert len(full) == len(part)
    for f, p in zip(full, part, strict=True):
        assert np.array_equal(f.expert_ids, p.expert_ids) and np.array_equal(f.doc_ids, p.doc_ids)
        assert np.array_equal(f.labels["lang"], p.labels["lang"]) and set(p.labels) == {"lang"}
        assert p.router_logits is None and f.router_logits is not None and (p.token_ids == -1).all()


def test_as_source_keeps_reader_options(tmp_path):
    import warnings

    import moe_routing as mr
    from moe_routing.store import TraceReader

    from .conftest import make_trace, write_sharded

    path = write_sharded(make_trace(0), tmp_path / "t", 3)
    src = M.as_source(path, skip_corrupt=True)
    assert isinstance(src, TraceReader) and src.skip_corrupt
    first = src.shards()[0]
    first.write_bytes(b"not parquet")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        df = mr.metrics.expert_load(src)  # the reader's skip_corrupt passes through every metric
    assert any("skipping" in str(w.message) for w in seen)
    assert df["count"].sum() > 0
