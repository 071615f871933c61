"""Causal measures on tiny real Qwen3MoeForCausalLM models: ablation effects, controls, claims, steering sets."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

import moe_routing as mr
from conftest import make_qwen3_moe, make_tokenizer
from moe_routing import MetricError
from moe_routing.metrics import causal

from .conftest import make_trace

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "der", "schnelle", "braune", "fuchs",
         "springt", "le", "renard", "brun", "saute", "par", "dessus", "chien"]
RUSSIAN = ["Быстрая", "коричневая", "лиса", "прыгает"]


def corpus(n: int = 24, seed: int = 0, *, russian: bool = False) -> pd.DataFrame:
    """Random word strings in three (or four) 'languages' (the label is a rotation; the texts differ)."""
    rng = np.random.default_rng(seed)
    langs = ["en", "de", "fr"] + (["ru"] if russian else [])
    rows = []
    for i in range(n):
        lang = langs[i % len(langs)]
        pool = RUSSIAN if lang == "ru" else WORDS
        rows.append({"text": " ".join(rng.choice(pool, size=int(rng.integers(3, 12)))), "lang": lang})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_qwen3_moe(3, layers=2, mlp_only_layers=())


def brute_nll(model, tok, text: str) -> np.ndarray:
    """Next-token NLL of one text, one plain forward (no batching, no padding)."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").double().numpy()


def row(frame: pd.DataFrame, lang, condition: str = "ablated") -> pd.Series:
    sel = frame[(frame["lang"] == lang) & (frame["condition"] == condition)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


# ---------------------------------------------------------------------------------------------- plumbing
def test_zero_ablation_equals_brute_force_on_zeroed_copy(model, tok) -> None:
    """mode='zero' per language == text-by-text NLL of a copy whose expert's down-projection is zero."""
    df = corpus(18)
    out = mr.metrics.ablation_effect(model, tok, df, {1: [2]}, mode="zero", n_random=0, n_boot=0, batch_size=5,
                                     progress=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[1].mlp.experts.down_proj[2] = 0
    for lang, group in df.groupby("lang"):
        diffs = np.concatenate([brute_nll(zeroed, tok, t) - brute_nll(model, tok, t) for t in group["text"]])
        clean = np.concatenate([brute_nll(model, tok, t) for t in group["text"]])
        r = row(out, lang)
        assert r["tokens"] == len(diffs)
        assert r["docs"] == len(group)
        assert r["delta"] == pytest.approx(diffs.mean(), abs=1e-5)
        assert r["abs_delta"] == pytest.approx(np.abs(diffs).mean(), abs=1e-5)
        assert r["nll_clean"] == pytest.approx(clean.mean(), abs=1e-5)
    assert abs(diffs).max() > 1e-4  # the ablation did something measurable


def test_padding_is_not_counted(model, tok) -> None:
    """Left- and right-padded batches give what one text per batch gives."""
    df = corpus(15, seed=1)
    kw = {"n_random": 2, "n_boot": 20, "progress": False}
    single = mr.metrics.ablation_effect(model, tok, df, {0: [1, 5]}, batch_size=1, **kw)
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    for t in (tok, left):
        batched = mr.metrics.ablation_effect(model, t, df, {0: [1, 5]}, batch_size=6, **kw)
        assert (batched["tokens"].to_numpy() == single["tokens"].to_numpy()).all()
        for c in ("delta", "ci_low", "ci_high", "abs_delta", "nll_clean"):
            np.testing.assert_allclose(batched[c].to_numpy(), single[c].to_numpy(), atol=2e-5, err_msg=c)
    expected = {lang: sum(len(tok(t)["input_ids"]) - 1 for t in g["text"]) for lang, g in df.groupby("lang")}
    assert single.groupby("lang")["tokens"].first().to_dict() == expected


def test_noise_floor_is_zero_in_fp32_and_cis_contain_the_point(model, tok) -> None:
    out = mr.metrics.ablation_effect(model, tok, corpus(30, seed=2), {0: [3], 1: [0]}, n_random=4, n_boot=100,
                                     progress=False)
    noise = out[out["condition"] == causal.NOISE_REPEAT]
    assert len(noise) == 3 and (noise["delta"] == 0).all() and (noise["abs_delta"] == 0).all()
    assert causal.NOISE_FP32 not in set(out["condition"])  # an fp32 model has no dtype floor
    finite = out.dropna(subset=["ci_low", "ci_high"])
    assert len(finite) == len(out)
    assert ((finite["ci_low"] <= finite["delta"] + 1e-12) & (finite["delta"] <= finite["ci_high"] + 1e-12)).all()
    assert (out.loc[out["condition"] == "ablated", "ci_high"] > out.loc[out["condition"] == "ablated", "ci_low"]).all()
    sets = out.attrs["random_sets"]
    assert len(sets) == 4 and all(set(s) == {0, 1} and len(s[0]) == 1 and len(s[1]) == 1 for s in sets)
    assert all(s[0] != [3] and s[1] != [0] for s in sets)  # drawn outside the tested experts
    means = out[out["condition"] == "random set"].groupby("lang")["delta"].mean()
    np.testing.assert_allclose(out[out["condition"] == "random"].set_index("lang")["delta"], means)


def test_fp32_floor_for_a_bf16_model(tok) -> None:
    m = make_qwen3_moe(4, layers=2, mlp_only_layers=()).to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = mr.metrics.ablation_effect(m, tok, corpus(9, seed=3), {0: [0]}, n_random=1, n_boot=10, progress=False)
    fp32 = out[out["condition"] == causal.NOISE_FP32]
    assert len(fp32) == 3 and (fp32["abs_delta"] > 0).all()  # bf16 rounding shows
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_corpus_forms_agree(model, tok) -> None:
    df = corpus(12, seed=4)
    kw = {"n_random": 1, "n_boot": 10, "progress": False}
    a = mr.metrics.ablation_effect(model, tok, df, {1: [4]}, **kw)
    b = mr.metrics.ablation_effect(model, tok, list(df["text"]), {1: [4]}, labels={"lang": list(df["lang"])}, **kw)
    c = mr.metrics.ablation_effect(model, tok, df.to_dict("records"), {1: [4]}, **kw)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)
    pooled = mr.metrics.ablation_effect(model, tok, list(df["text"]), {1: [4]}, by=None, **kw)
    r = pooled[pooled["condition"] == "ablated"].iloc[0]
    per = a[a["condition"] == "ablated"]
    assert r["tokens"] == per["tokens"].sum()
    assert r["delta"] == pytest.approx((per["delta"] * per["tokens"]).sum() / per["tokens"].sum())


def test_expert_importance_rows_equal_single_ablations(model, tok) -> None:
    df = corpus(12, seed=5)
    kw = {"n_boot": 30, "batch_size": 4, "progress": False, "seed": 7}
    imp = mr.metrics.expert_importance(model, tok, df, 1, **kw)
    assert len(imp) == 8 * 3 and set(imp["expert"]) == set(range(8))
    for e in (0, 5):
        one = mr.metrics.ablation_effect(model, tok, df, {1: [e]}, n_random=0, **kw)
        for lang in ("en", "de", "fr"):
            r = imp[(imp["expert"] == e) & (imp["lang"] == lang)].iloc[0]
            o = row(one, lang)
            for c in ("delta", "ci_low", "ci_high", "abs_delta", "nll_clean", "tokens", "docs"):
                assert r[c] == pytest.approx(o[c], abs=1e-12), c


# ---------------------------------------------------------------------------------------------- effects
def test_a_massive_expert_matters_more_than_random_sets(tok) -> None:
    m = make_qwen3_moe(5, layers=2, mlp_only_layers=())
    with torch.no_grad():
        m.model.layers[0].mlp.experts.down_proj[6] *= 1000
    df = corpus(24, seed=6)
    # zero-ablation: random sets remove ordinary experts only
    out = mr.metrics.ablation_effect(m, tok, df, {0: [6]}, mode="zero", n_random=6, n_boot=50, progress=False)
    sets = out[out["condition"] == "random set"]
    for lang in ("en", "de", "fr"):
        target = row(out, lang)
        assert target["abs_delta"] > 10 * sets.loc[sets["lang"] == lang, "abs_delta"].max()
        assert abs(target["delta"]) > 10 * sets.loc[sets["lang"] == lang, "delta"].abs().max()
    # reroute: a banned ordinary expert's tokens may move onto the massive one, so random sets matter too, less
    out = mr.metrics.ablation_effect(m, tok, df, {0: [6]}, n_random=6, n_boot=50, progress=False)
    for lang in ("en", "de", "fr"):
        assert row(out, lang)["abs_delta"] > row(out, lang, "random")["abs_delta"]


def crafted_model(tok, texts_ru: list[str], texts_latin: list[str]):
    """Layer 0 sends the tokens only Russian text uses to expert 3 (top-1). Banned, they go to expert 5, which
    writes a huge value into hidden coordinate 2, which the LM head reads as "the next token is j+ (or j-)", two
    tokens Russian text never has: Russian NLL rises. Other tokens reach neither expert (very negative router
    logits for 3 and 5), so banning 3 changes nothing for them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=1, norm_topk_prob=True, mlp_only_layers=[], max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False,
    )
    m = AutoModelForCausalLM.from_config(cfg).eval()
    ru = {i for t in texts_ru for i in tok(t)["input_ids"]}
    latin = {i for t in texts_latin for i in tok(t)["input_ids"]}
    only_ru = sorted(ru - latin)
    j_plus, j_minus = sorted(latin - ru)[:2]
    assert len(only_ru) >= 5
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb[:, 0:3] = 0.0
        emb[:, 1] = 1.0
        emb[only_ru, 0] = 1.0
        gate = m.model.layers[0].mlp.gate.weight
        gate[3] = 0.0
        gate[5] = 0.0
        gate[3, 0], gate[3, 1] = 10.0, -5.0
        gate[5, 0], gate[5, 1] = 8.0, -5.0
        down = m.model.layers[0].mlp.experts.down_proj
        down[5] = 0.0
        down[5, 2, :] = 1000.0
        m.lm_head.weight[j_plus] = 0.0
        m.lm_head.weight[j_minus] = 0.0
        m.lm_head.weight[j_plus, 2] = 10.0
        m.lm_head.weight[j_minus, 2] = -10.0
    return m


def test_check_claim_holds_for_a_language_expert_and_not_for_another_language(tok) -> None:
    df = corpus(32, seed=8, russian=True)
    m = crafted_model(tok, list(df.loc[df["lang"] == "ru", "text"]), list(df.loc[df["lang"] != "ru", "text"]))
    kw = {"n_random": 5, "n_boot": 60, "progress": False}
    claim = mr.metrics.check_claim(m, tok, df, {0: [3]}, "ru", **kw)
    assert claim.holds, claim.sentence
    assert claim.target.ci_low > claim.random.ci_high and claim.target.ci_low > claim.others.ci_high
    assert claim.beats_random == 1.0
    assert claim.sentence.startswith("ablating experts {L0: 3} (reroute) raises ru's NLL by +")
    assert "other languages" in claim.sentence and "the claim holds" in claim.sentence
    # the numbers are the frame's
    t = row(claim.frame, "ru")
    assert (claim.target.delta, claim.target.ci_low, claim.target.ci_high) == (t["delta"], t["ci_low"], t["ci_high"])
    r = row(claim.frame, "ru", "random")
    assert (claim.random.delta, claim.random.ci_low, claim.random.ci_high) == (r["delta"], r["ci_low"], r["ci_high"])
    other = claim.frame[(claim.frame["condition"] == "ablated") & (claim.frame["lang"] != "ru")]
    assert claim.others.delta == pytest.approx((other["delta"] * other["tokens"]).sum() / other["tokens"].sum())
    assert list(claim.summary()["what"]) == ["target", "others", "random sets", "noise: repeat"]

    wrong = mr.metrics.check_claim(m, tok, df, {0: [3]}, "en", **kw)
    assert not wrong.holds and "does not hold" in wrong.sentence and wrong.reasons
    assert wrong.target.delta < wrong.others.delta


def test_ablation_matrix_equals_check_claim_and_ablation_effect_per_set(tok) -> None:
    """One shared pass gives the same claims as check_claim and the same rows as ablation_effect, per set."""
    df = corpus(24, seed=8, russian=True)
    m = crafted_model(tok, list(df.loc[df["lang"] == "ru", "text"]), list(df.loc[df["lang"] != "ru", "text"]))
    kw = {"n_random": 3, "n_boot": 40, "progress": False, "seed": 3}
    sets = {"ru": {0: [3]}, "en": {1: [2, 4]}}
    out = mr.metrics.ablation_matrix(m, tok, df, sets, modes=("reroute", "zero"), **kw)
    assert set(out.claims) == {"ru", "en"}
    for name, experts in sets.items():
        alone = mr.metrics.check_claim(m, tok, df, experts, name, **kw)
        got = out.claims[name]
        assert (got.target, got.others, got.random, got.noise, got.holds) == (
            alone.target, alone.others, alone.random, alone.noise, alone.holds), name
        assert out.random_sets[name] == alone.frame.attrs["random_sets"]
        pd.testing.assert_frame_equal(got.frame, alone.frame)
        zero = mr.metrics.ablation_effect(m, tok, df, experts, mode="zero", n_random=0, n_boot=40, progress=False,
                                          seed=3)
        mine = out.frame[(out.frame["set"] == name) & (out.frame["mode"] == "zero")].set_index("lang")
        for lang in ("en", "de", "fr", "ru"):
            r = row(zero, lang)
            assert (mine.at[lang, "delta"], mine.at[lang, "ci_low"], mine.at[lang, "ci_high"]) == (
                r["delta"], r["ci_low"], r["ci_high"])
            assert np.isnan(mine.at[lang, "random"])
    assert out.claims["ru"].holds and not out.claims["en"].holds
    mat = out.matrix()
    assert list(mat.index) == ["ru", "en"] and mat.at["ru", "ru"] == out.claims["ru"].target.delta
    assert out.matrix("random").at["ru", "ru"] == out.claims["ru"].random.delta
    with pytest.raises(MetricError, match="was not run"):
        out.matrix(mode="renormalize")
    with pytest.raises(MetricError, match="n_random must be at least 1"):
        mr.metrics.ablation_matrix(m, tok, df, sets, n_random=0, progress=False)
    with pytest.raises(MetricError, match="unknown modes"):
        mr.metrics.ablation_matrix(m, tok, df, sets, modes=("drop",), progress=False)
    with pytest.raises(MetricError, match="not an MoE layer"):
        mr.metrics.ablation_matrix(m, tok, df, {"ru": {9: [0]}}, progress=False)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_project_errors(model, tok) -> None:
    df = corpus(6)
    kw = {"progress": False, "n_boot": 0, "n_random": 0}
    with pytest.raises(MetricError, match="not an MoE layer"):
        mr.metrics.ablation_effect(model, tok, df, {7: [0]}, **kw)
    with pytest.raises(MetricError, match=r"expert ids in \[0, 8\)"):
        mr.metrics.ablation_effect(model, tok, df, {0: [8]}, **kw)
    with pytest.raises(MetricError, match="twice"):
        mr.metrics.ablation_effect(model, tok, df, {0: [1, 1]}, **kw)
    with pytest.raises(MetricError, match="non-empty mapping"):
        mr.metrics.ablation_effect(model, tok, df, [0, 1], **kw)
    with pytest.raises(MetricError, match="has no 'lang' label"):
        mr.metrics.ablation_effect(model, tok, list(df["text"]), {0: [1]}, **kw)
    with pytest.raises(mr.CorpusError, match="'dialect'"):
        mr.metrics.ablation_effect(model, tok, df, {0: [1]}, by="dialect", **kw)
    with pytest.raises(MetricError, match="batch_size"):
        mr.metrics.ablation_effect(model, tok, df, {0: [1]}, batch_size=0, **kw)
    with pytest.raises(MetricError, match="has no token"):
        mr.metrics.check_claim(model, tok, df, {0: [1]}, "xx", progress=False, n_boot=0, n_random=1)
    with pytest.raises(MetricError, match="n_random"):
        mr.metrics.check_claim(model, tok, df, {0: [1]}, "en", progress=False, n_random=0)
    with pytest.raises(MetricError, match="not an MoE layer"):
        mr.metrics.expert_importance(model, tok, df, 5, progress=False)
    with pytest.raises(mr.CorpusError, match="no tokens"):
        mr.metrics.ablation_effect(model, tok, pd.DataFrame({"text": ["  "], "lang": ["en"]}), {0: [1]}, **kw)


# ---------------------------------------------------------------------------------------------- steering
def test_steering_set_matches_brute_force() -> None:
    a, b = make_trace(1, skew=2.0, n_docs=18), make_trace(2, n_docs=15)
    out = mr.metrics.steering_set(a, b, [1, 4], top=3)
    for layer in (1, 4):
        got = out[out["layer"] == layer].set_index("expert")
        li = a.layer_index(layer)
        for e in range(8):
            ra = np.mean([e in set(a.expert_ids[t, li].tolist()) for t in range(a.num_tokens)])
            rb = np.mean([e in set(b.expert_ids[t, li].tolist()) for t in range(b.num_tokens)])
            assert got.loc[e, "rate_a"] == pytest.approx(ra) and got.loc[e, "rate_b"] == pytest.approx(rb)
            assert got.loc[e, "risk_diff"] == pytest.approx(ra - rb)
        rd = got["risk_diff"]
        promote = set(rd[rd > 0].sort_values(ascending=False).index[:3])
        suppress = set(rd[rd < 0].sort_values().index[:3])
        assert set(got.index[got["steer"] == "promote"]) == promote
        assert set(got.index[got["steer"] == "suppress"]) == suppress
        assert list(rd) == sorted(rd, reverse=True)
    # streamed from chunks == in memory
    from .conftest import split_by_docs

    pd.testing.assert_frame_equal(mr.metrics.steering_set(split_by_docs(a, 3), b, [1, 4], top=3), out)
    bias = mr.metrics.steering_bias(out, 2.5)
    assert bias == {
        int(la): {int(e): (2.5 if s == "promote" else -2.5) for e, s in zip(g["expert"], g["steer"], strict=True) if s}
        for la, g in out.groupby("layer")
    }
    assert all(v > 0 for v in mr.metrics.steering_bias(out, 1.0, suppress=False)[1].values())


def test_steering_set_errors() -> None:
    a = make_trace(1)
    with pytest.raises(MetricError, match="not in the trace"):
        mr.metrics.steering_set(a, a, 2)
    with pytest.raises(MetricError, match="number of experts"):
        mr.metrics.steering_set(a, make_trace(2, num_experts=6), 1)
    with pytest.raises(MetricError, match="top"):
        mr.metrics.steering_set(a, a, 1, top=0)
    with pytest.raises(MetricError, match="steering_set frame"):
        mr.metrics.steering_bias(pd.DataFrame({"x": [1]}), 1.0)
