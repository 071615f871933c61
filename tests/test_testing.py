"""moe_routing.testing: trace comparison with a diff, synthetic traces, tiny real models and routing-shape proxies.

The proxies' main job (``demo_runs``: capture the demo corpus into a trace directory, then the notebooks'
metrics on it) runs on the Qwen3-30B-A3B and DeepSeek-V3 shapes in ``test_main_job_on_a_routing_proxy``
(slow; measured on 2 cores shared by many jobs, load ~14: the Qwen3-30B shape captured 2,574 tokens (6
languages x 15 texts) in 329 s, so the corpus is 3 languages x 5 texts; the test prints its own timings).
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

import moe_routing as mr
from moe_routing.errors import MoERoutingError
from moe_routing.testing import (
    ROUTING_SHAPES,
    assert_traces_equal,
    proxy_config,
    routing_proxy,
    synthetic_trace,
    tiny_moe,
    tiny_tokenizer,
)


# ------------------------------------------------------------------------------------------ assert_traces_equal
def test_equal_traces_pass_and_a_copy_is_equal() -> None:
    a = synthetic_trace(seed=3, logits=True)
    assert_traces_equal(a, synthetic_trace(seed=3, logits=True))
    assert_traces_equal(a, a.select(np.arange(a.num_tokens)))


def test_the_diff_names_each_array_and_the_first_entries() -> None:
    a = synthetic_trace(seed=0)
    ids = a.expert_ids.copy()
    ids[5, 1, 0], ids[9, 2, 1] = (ids[5, 1, 0] + 1) % 8, (ids[9, 2, 1] + 1) % 8
    lang = a.label("lang").copy()
    lang[0] = "xx"
    b = mr.RoutingTrace.from_arrays(ids, a.weights, layers=a.layers, num_experts=a.num_experts,
                                    labels={**a.labels, "lang": lang}, token_ids=a.token_ids, doc_ids=a.doc_ids,
                                    positions=a.positions)
    with pytest.raises(AssertionError) as err:
        assert_traces_equal(a, b)
    msg = str(err.value)
    assert "expert_ids: 2 of" in msg and "at (5, 1, 0)" in msg and "at (9, 2, 1)" in msg
    assert f"{a.expert_ids[5, 1, 0]!r} != {ids[5, 1, 0]!r}" in msg
    assert "label 'lang': 1 of" in msg and "'xx'" in msg
    assert "weights" not in msg and "token_ids" not in msg  # only what differs


def test_the_diff_reports_shapes_labels_logits_and_tolerances() -> None:
    a = synthetic_trace(seed=1, logits=True)
    with pytest.raises(AssertionError, match=r"layers: \(1, 3, 4\) != \(1, 3, 5\)"):
        assert_traces_equal(a, synthetic_trace(seed=1, layers=(1, 3, 5), logits=True))
    with pytest.raises(AssertionError, match=r"num_tokens.*\n.*expert_ids: shape"):
        assert_traces_equal(a, a.select(np.arange(a.num_tokens - 1)))
    with pytest.raises(AssertionError, match="router_logits: present in the first, absent in the second"):
        assert_traces_equal(a, synthetic_trace(seed=1))
    with pytest.raises(AssertionError, match=re.escape("labels: only in the first ['domain', 'pair', 'phase']")):
        assert_traces_equal(a, synthetic_trace(seed=1, logits=True, labels=("lang",)))
    nudged = synthetic_trace(seed=1, logits=True)
    nudged.weights[0, 0, 0] += 1e-6
    with pytest.raises(AssertionError, match=r"weights: 1 of .*\n\s+at \(0, 0, 0\)"):
        assert_traces_equal(a, nudged)
    assert_traces_equal(a, nudged, atol=1e-5)
    with pytest.raises(AssertionError, match="model_name"):
        assert_traces_equal(a, synthetic_trace(seed=1, logits=True, model_name="other"), check_model_name=True)
    with pytest.raises(TypeError, match="RoutingTrace"):
        assert_traces_equal(a, a.expert_ids)  # type: ignore[arg-type]


def test_many_differences_are_cut_after_show() -> None:
    a, b = synthetic_trace(seed=0), synthetic_trace(seed=1, n_docs=12)
    b = synthetic_trace(seed=0, skew=3.0)
    with pytest.raises(AssertionError, match=r"\.\.\. and \d+ more") as err:
        assert_traces_equal(a, b, show=2)
    assert len(re.findall(r"^\s+at \(", str(err.value), flags=re.M)) == 2 * 2  # expert_ids and weights


# ------------------------------------------------------------------------------------------ synthetic_trace
def test_synthetic_trace_shape_labels_and_routing_rules() -> None:
    t = synthetic_trace(n_docs=6, doc_len=(5, 9), layers=(0, 2), num_experts=16, top_k=4, seed=2)
    assert t.layers == (0, 2) and t.num_experts == 16 and t.top_k == 4
    lens = np.bincount(t.doc_ids)
    assert len(lens) == 6 and lens.min() >= 5 and lens.max() <= 9
    assert set(t.labels) == {"lang", "domain", "phase", "pair"}
    assert list(t.label("lang")[np.r_[True, t.doc_ids[1:] != t.doc_ids[:-1]]]) == ["en", "de", "ja"] * 2
    assert all(len(set(row)) == 4 for row in t.expert_ids.reshape(-1, 4))  # distinct experts per slot row
    assert np.allclose(t.weights.sum(axis=2), 1, atol=1e-6)
    assert (np.diff(t.weights, axis=2) <= 0).all()  # descending without shuffle_slots
    shuffled = synthetic_trace(n_docs=6, doc_len=(5, 9), layers=(0, 2), num_experts=16, top_k=4, seed=2,
                               shuffle_slots=True)
    assert (np.diff(shuffled.weights, axis=2) > 0).any()
    assert np.array_equal(np.sort(shuffled.expert_ids, axis=2), np.sort(t.expert_ids, axis=2))


def test_synthetic_trace_options() -> None:
    cyc = synthetic_trace(n_docs=2, doc_len=5, token_cycle=[7, 8], doc_ids=[10, 20])
    assert cyc.token_ids.tolist() == [7, 8, 7, 8, 7] * 2 and sorted(set(cyc.doc_ids)) == [10, 20]
    empty = synthetic_trace(empty_frac=0.3, seed=4)
    share = (empty.expert_ids == -1).mean()
    assert 0.2 < share < 0.4 and (empty.weights[empty.expert_ids == -1] == 0).all()
    assert not synthetic_trace(weights=False).has_weights
    biased = synthetic_trace(n_docs=30, lang_bias={"de": {5: 4.0}})
    de = biased.label("lang") == "de"
    assert (biased.expert_ids[de] == 5).any(axis=2).mean() > 0.9 > (biased.expert_ids[~de] == 5).any(axis=2).mean()
    with pytest.raises(MoERoutingError, match="top_k"):
        synthetic_trace(top_k=9, num_experts=8)


def test_skew_makes_routing_depend_on_the_language() -> None:
    plain, skewed = synthetic_trace(n_docs=30, seed=5), synthetic_trace(n_docs=30, seed=5, skew=2.0)
    a = mr.metrics.label_nmi(plain, "lang", n_shuffles=0)["nmi"].mean()
    b = mr.metrics.label_nmi(skewed, "lang", n_shuffles=0)["nmi"].mean()
    assert b > 3 * a


# ------------------------------------------------------------------------------------------ tiny models
@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss", "olmoe"])
def test_tiny_moe_is_a_real_family_model_that_capture_reads(model_type: str) -> None:
    model = tiny_moe(model_type)
    assert model.config.model_type == model_type and not model.training
    assert model.config.hidden_size == 32
    ids = torch.randint(2, 128, (2, 7))
    with mr.capture(model) as rec, torch.no_grad():
        model(input_ids=ids)
    trace = rec.trace()
    assert trace.num_tokens == 14 and trace.num_experts == 8 and trace.top_k == 2
    again = tiny_moe(model_type)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values(),
                                                strict=True))


def test_tiny_moe_overrides_resolve_config_aliases() -> None:
    model = tiny_moe("qwen3_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=2, mlp_only_layers=[])
    assert (model.config.num_experts, model.config.num_experts_per_tok) == (16, 4)  # alias of num_local_experts
    assert len(model.model.layers) == 2
    assert tiny_moe("qwen3_moe", hidden_size=64).model.layers[0].self_attn.head_dim == 16  # follows the hidden size
    with pytest.raises(MoERoutingError, match="no_such_family"):
        tiny_moe("no_such_family")


def test_tiny_tokenizer_is_byte_level() -> None:
    tok = tiny_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    for text in ("Hello", "こんにちは", "مرحبا 🙂"):
        assert tok.decode(tok(text)["input_ids"]) == text


# ------------------------------------------------------------------------------------------ proxies
EXPECTED = {  # name: (MoE layers, experts, top-k, first MoE layer)
    "qwen3-30b-a3b": (48, 128, 8, 0),
    "qwen3-235b-a22b": (94, 128, 8, 0),
    "deepseek-v3": (58, 256, 8, 3),
    "mixtral-8x7b": (32, 8, 2, 0),
    "gpt-oss-120b": (36, 128, 4, 0),
}


@pytest.mark.parametrize("name", sorted(ROUTING_SHAPES))
def test_proxy_configs_have_the_real_routing_shape(name: str) -> None:
    c = proxy_config(name)
    layers, experts, k, first = EXPECTED[name]
    n_experts = next(getattr(c, a) for a in ("num_experts", "n_routed_experts", "num_local_experts") if hasattr(c, a))
    assert (n_experts, c.num_experts_per_tok) == (experts, k)
    assert c.num_hidden_layers == layers + first and c.hidden_size == 64
    if name == "deepseek-v3":
        assert (c.n_group, c.topk_group, c.first_k_dense_replace, c.n_shared_experts) == (8, 4, 3, 1)
    with pytest.raises(MoERoutingError, match="known"):
        proxy_config("qwen9")


def test_a_saved_proxy_loads_like_a_downloaded_model(tmp_path) -> None:
    path = routing_proxy("mixtral-8x7b", tmp_path / "mixtral")
    model, tok = mr.load_model(str(path))
    with mr.capture(model) as rec, torch.no_grad():
        model(**tok(["Guten Tag", "Hello there"], return_tensors="pt", padding=True))
    trace = rec.trace()
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (32, 8, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3"])
def test_main_job_on_a_routing_proxy(name: str, tmp_path) -> None:
    """The pipeline's capture step (``demo_runs``, as ``moe-routing demo --model DIR`` runs it) on a small demo
    corpus, then the notebooks' headline metrics on the trace directory, at the real routing shape."""
    from moe_routing.demo_pipeline import demo_runs

    layers, experts, k, first = EXPECTED[name]
    t0 = time.perf_counter()
    path = routing_proxy(name, tmp_path / name)
    t1 = time.perf_counter()
    langs = ["en", "ru", "ja"]
    run = demo_runs(str(path), tmp_path / "runs", parts=("heldout",), langs=langs, max_per_lang=5,
                    batch_size=15, progress=False)["model/heldout"]
    t2 = time.perf_counter()
    reader = mr.open_trace(run)
    assert reader.complete
    trace = mr.RoutingTrace.load(run)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (layers, experts, k)
    assert trace.layers[0] == first and set(trace.label("lang")) == set(langs)
    assert trace.expert_ids.min() >= 0 and trace.expert_ids.max() < experts
    balance = mr.metrics.load_balance(run)
    assert len(balance) == layers
    nmi = mr.metrics.label_nmi(run, "lang", n_shuffles=2)
    assert len(nmi) == layers and nmi["nmi"].between(0, 1).all()
    usage = mr.metrics.language_usage(run, "lang")
    assert usage["expert"].nunique() <= experts and set(usage["lang"]) == set(langs)
    print(f"\n{name}: proxy saved in {t1 - t0:.1f} s, {trace.num_tokens} tokens captured in {t2 - t1:.1f} s, "
          f"metrics in {time.perf_counter() - t2:.1f} s")
