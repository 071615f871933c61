"""mr.intervene: every mode, per family, against the model's own routers (tiny random models of the real classes).

Per family with a selection rule (``readings.RULES``):

1. the replayed rule on unmodified logits is bit-identical to the router's own (ids, weights);
2. ``zero`` equals the same model with that expert's down-projection zeroed; ``renormalize`` keeps slot sums;
3. ``reroute``: the banned expert never runs at that layer; tokens that had not chosen it keep their ids and
   weights exactly; the others get their next choice;
4. ``force``: the forced expert runs for every token; ``bias`` with a large delta equals force, 0 changes nothing;
5. ``where`` restricts to some tokens without leaking across batch rows; generate() and padding work;
6. nothing remains after the block, also after an exception.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import arch_configs as ac
import moe_routing as mr
from moe_routing.adapters import find_moe_layers, resolve_adapter
from moe_routing.errors import CaptureError, InterventionError, MoERoutingError
from moe_routing.readings import RULES

FAMILIES = [f for f in RULES if f in ac.ARCHS and not ac.ARCHS[f].skip]
SEQ = 9


def _corrected(model: nn.Module) -> nn.Module:
    """DeepSeek-style routers: a non-zero e_score_correction_bias, large enough to change selections."""
    g = torch.Generator().manual_seed(7)
    for module in model.modules():
        b = getattr(module, "e_score_correction_bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_(torch.rand(b.shape, generator=g) * 0.2 - 0.1)
    return model


@functools.cache
def model_for(family: str) -> nn.Module:
    with torch.no_grad():
        return _corrected(ac.build(ac.ARCHS[family]))


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, ac.VOCAB, (batch, seq), generator=g)


def moe(model: nn.Module):
    return find_moe_layers(model, resolve_adapter(model))


def route(model: nn.Module, ids: torch.Tensor, **kw) -> tuple[torch.Tensor, mr.RoutingTrace]:
    """Logits and the captured trace of one forward (inside whatever intervention is active)."""
    with torch.no_grad(), mr.capture(model) as rec:
        out = model(ids, **kw).logits
    return out, rec.trace()


def router_outputs(model: nn.Module, ids: torch.Tensor) -> dict[int, tuple]:
    """What each router returned (this file's own hooks, not the library's)."""
    seen: dict[int, tuple] = {}
    handles = [m.router.register_forward_hook(
        lambda mod, a, out, la=m.layer: seen.__setitem__(la, tuple(o.detach().clone() for o in out)))
        for m in moe(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def hooks_of(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def often_chosen(trace: mr.RoutingTrace, j: int) -> int:
    """The expert chosen most often at trace layer j (it surely affects some tokens)."""
    return int(np.bincount(trace.expert_ids[:, j].ravel(), minlength=trace.num_experts).argmax())


def rarely_chosen(trace: mr.RoutingTrace, j: int) -> int:
    counts = np.bincount(trace.expert_ids[:, j].ravel(), minlength=trace.num_experts)
    return int(counts.argmin())


def as_sets(ids: np.ndarray) -> list[frozenset]:
    return [frozenset(r.tolist()) for r in ids]


# ---------------------------------------------------------------------------------------------- 1. exact replay
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_is_bit_identical_to_router(family):
    model = model_for(family)
    reading = RULES[family]
    outs = router_outputs(model, tokens(3, 11))
    assert outs
    for m in moe(model):
        out = outs[m.layer]
        ids, w = reading.function(out[reading.logits_at], reading.params(m.router))
        assert torch.equal(ids, out[reading.ids_at]), (family, m.layer)
        assert torch.equal(w, out[reading.weights_at]), (family, m.layer)
        assert w.dtype == out[reading.weights_at].dtype


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_under_bf16(family):
    model = copy.deepcopy(model_for(family)).to(torch.bfloat16)
    reading = RULES[family]
    outs = router_outputs(model, tokens(2, 7))
    for m in moe(model):
        out = outs[m.layer]
        ids, w = reading.function(out[reading.logits_at], reading.params(m.router))
        assert torch.equal(ids, out[reading.ids_at]) and torch.equal(w, out[reading.weights_at])


# ---------------------------------------------------------------------------------------------- 2. zero / renormalize
def _zeroed_copy(model: nn.Module, layer: int, expert: int) -> nn.Module:
    other = copy.deepcopy(model)
    experts = next(m for m in moe(other) if m.layer == layer).module
    with torch.no_grad():
        experts.down_proj[expert].zero_()
        if getattr(experts, "down_proj_bias", None) is not None:
            experts.down_proj_bias[expert].zero_()
    return other


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_equals_zeroed_down_projection(family):
    model = model_for(family)
    ids = tokens()
    base, trace = route(model, ids)
    layer = trace.layers[0]
    e = often_chosen(trace, 0)
    with mr.intervene(model, ablate={layer: [e]}, mode="zero"):
        out, t_in = route(model, ids)
    with torch.no_grad():
        want = _zeroed_copy(model, layer, e)(ids).logits
    assert not torch.allclose(out, base, atol=1e-6)  # the expert mattered
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    hit = (trace.expert_ids[:, 0] == e)
    assert np.array_equal(t_in.expert_ids[:, 0], trace.expert_ids[:, 0])  # zero keeps the selection
    assert np.all(t_in.weights[:, 0][hit] == 0) and np.array_equal(t_in.weights[:, 0][~hit], trace.weights[:, 0][~hit])


@pytest.mark.parametrize("family", FAMILIES)
def test_renormalize_keeps_slot_weight_sum(family):
    model = model_for(family)
    ids = tokens()
    _, trace = route(model, ids)
    layer, e = trace.layers[0], often_chosen(trace, 0)
    with mr.intervene(model, ablate={layer: [e]}, mode="renormalize"):
        _, t_in = route(model, ids)
    hit = (trace.expert_ids[:, 0] == e)
    rows = hit.any(axis=1)
    assert rows.any()
    w0, w1 = trace.weights[:, 0], t_in.weights[:, 0]
    assert np.all(w1[hit] == 0)
    np.testing.assert_allclose(w1.sum(axis=1)[rows], w0.sum(axis=1)[rows], rtol=1e-5)
    scale = w0.sum(axis=1) / np.where(hit, 0, w0).sum(axis=1)
    np.testing.assert_allclose(w1[rows & ~hit.all(axis=1)], (np.where(hit, 0, w0) * scale[:, None])[rows], rtol=1e-5)
    assert np.array_equal(w1[~rows], w0[~rows])


# ---------------------------------------------------------------------------------------------- 3. reroute
@pytest.mark.parametrize("family", FAMILIES)
def test_reroute_bans_the_expert(family):
    model = model_for(family)
    ids = tokens(3, 11)
    base, trace = route(model, ids)
    j, layer = 0, trace.layers[0]
    e = often_chosen(trace, j)
    with mr.intervene(model, ablate={layer: [e]}) as iv:
        out, t_in = route(model, ids)
    assert iv.verified == {layer}
    assert not (t_in.expert_ids[:, j] == e).any()  # never runs at that layer
    chose = (trace.expert_ids[:, j] == e).any(axis=1)
    assert chose.any() and not chose.all()
    # the first intervened layer: tokens that had not chosen it keep exactly their ids and weights
    assert np.array_equal(t_in.expert_ids[~chose, j], trace.expert_ids[~chose, j])
    assert np.array_equal(t_in.weights[~chose, j], trace.weights[~chose, j])
    assert not torch.equal(out, base)
    if RULES[family].rule != "sigmoid_bias_group":  # next choice: the other experts stay, one new one joins
        for old, new in zip(as_sets(trace.expert_ids[chose, j]), as_sets(t_in.expert_ids[chose, j]), strict=True):
            assert old - {e} <= new and len(new - old) == 1


def test_reroute_next_choice_is_the_routers_next_rank():
    model = model_for("qwen3_moe")
    ids = tokens(3, 11)
    m0 = moe(model)[0]
    logits = router_outputs(model, ids)[m0.layer][0]
    probs = torch.softmax(logits.float(), dim=-1)
    k = m0.router.top_k
    rank = torch.topk(probs, k + 1, dim=-1).indices
    e = int(torch.mode(rank[:, 0]).values)
    with mr.intervene(model, ablate={m0.layer: [e]}):
        _, t_in = route(model, ids)
    got = torch.as_tensor(t_in.expert_ids[:, 0])
    want = torch.stack([r[r != e][:k] for r in rank])
    assert torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values.to(got.dtype))
    w = probs.gather(-1, want)
    if m0.router.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    np.testing.assert_array_equal(np.sort(t_in.weights[:, 0], axis=1), np.sort(w.numpy(), axis=1))


@pytest.mark.parametrize("family", [f for f in FAMILIES if RULES[f].rule == "sigmoid_bias_group"])
def test_reroute_group_router_drops_from_group_scores(family):
    """With the correction bias, a ban must act on group scores too: replay the family's arithmetic by hand."""
    model = model_for(family)
    ids = tokens(3, 11)
    m0 = moe(model)[0]
    r = m0.router
    assert r.e_score_correction_bias.abs().sum() > 0
    logits = router_outputs(model, ids)[m0.layer][0]
    _, trace = route(model, ids)
    e = often_chosen(trace, 0)
    with mr.intervene(model, ablate={m0.layer: [e]}):
        _, t_in = route(model, ids)
    scores = logits.sigmoid()
    choice = scores + r.e_score_correction_bias
    choice[:, e] = float("-inf")
    size = r.num_experts // r.num_group
    groups = choice.view(-1, r.num_group, size).topk(2, dim=-1).values.sum(-1)
    keep = groups.topk(r.topk_group, dim=-1).indices
    allowed = torch.zeros_like(choice, dtype=torch.bool)
    for g in range(r.num_group):
        allowed[:, g * size:(g + 1) * size] = (keep == g).any(-1, keepdim=True)
    want = choice.masked_fill(~allowed, float("-inf")).topk(r.top_k, dim=-1).indices
    assert as_sets(t_in.expert_ids[:, 0]) == as_sets(want.numpy())


# ---------------------------------------------------------------------------------------------- 4. force and bias
@pytest.mark.parametrize("family", FAMILIES)
def test_force_runs_for_every_token(family):
    model = model_for(family)
    ids = tokens()
    _, trace = route(model, ids)
    layer = trace.layers[-1]
    e = rarely_chosen(trace, -1)
    with mr.intervene(model, force={layer: [e]}):
        _, t_in = route(model, ids)
    assert (t_in.expert_ids[:, -1] == e).any(axis=1).all()
    had = (trace.expert_ids[:, -1] == e).any(axis=1)
    assert not had.all()
    # tokens that had it keep their routing at the first intervened layer... (only layer touched: the last)
    first = trace.layers.index(layer)
    assert np.array_equal(t_in.expert_ids[:, :first], trace.expert_ids[:, :first])
    if RULES[family].rule != "sigmoid_bias_group":  # the lowest-ranked slot drops, the others stay
        for old, new in zip(as_sets(trace.expert_ids[~had, -1]), as_sets(t_in.expert_ids[~had, -1]), strict=True):
            assert len(old & new) == len(old) - 1 and e in new


@pytest.mark.parametrize("family", FAMILIES)
def test_bias_large_equals_force_and_zero_equals_nothing(family):
    model = model_for(family)
    ids = tokens()
    base, trace = route(model, ids)
    layer, e = trace.layers[0], rarely_chosen(trace, 0)
    with mr.intervene(model, force={layer: [e]}):
        forced, t_force = route(model, ids)
    with mr.intervene(model, bias={layer: {e: 1e4}}):
        biased, t_bias = route(model, ids)
    assert as_sets(t_bias.expert_ids.reshape(-1, trace.top_k)) == as_sets(t_force.expert_ids.reshape(-1, trace.top_k))
    torch.testing.assert_close(biased, forced, rtol=1e-5, atol=1e-6)
    with mr.intervene(model, bias={layer: {e: 0.0}}):
        same, t_same = route(model, ids)
    assert torch.equal(same, base)
    assert np.array_equal(t_same.expert_ids, trace.expert_ids) and np.array_equal(t_same.weights, trace.weights)
    with mr.intervene(model, bias={layer: {e: -1e4}}):
        _, t_neg = route(model, ids)
    assert not (t_neg.expert_ids[:, 0] == e).any()


def test_bias_moderate_steers_toward_the_expert():
    model = model_for("qwen3_moe")
    ids = tokens(3, 11)
    _, trace = route(model, ids)
    layer, e = trace.layers[0], rarely_chosen(trace, 0)
    before = (trace.expert_ids[:, 0] == e).any(axis=1).mean()
    with mr.intervene(model, bias={layer: {e: 0.5}}):
        _, t_in = route(model, ids)
    after = (t_in.expert_ids[:, 0] == e).any(axis=1).mean()
    assert after > before


# ---------------------------------------------------------------------------------------------- 5. where, generate, padding
def test_where_mask_restricts_and_does_not_leak_across_rows():
    model = model_for("qwen3_moe")
    row = tokens(1, SEQ)
    ids = row.repeat(2, 1)  # two identical prompts
    base, trace = route(model, ids)
    layer, e = trace.layers[0], often_chosen(trace, 0)
    mask = torch.zeros(2, SEQ, dtype=torch.bool)
    mask[0, 4:] = True
    with mr.intervene(model, ablate={layer: [e]}, where=mask):
        out, t_in = route(model, ids)
    assert torch.equal(out[1], base[1])  # row 1 untouched
    assert torch.equal(out[0, :4], base[0, :4])  # before the mask nothing changes (causal attention)
    n = SEQ
    ids0, ids1 = trace.expert_ids[:, 0], t_in.expert_ids[:, 0]
    assert np.array_equal(ids1[n:], ids0[n:])
    assert not (ids1[4:n] == e).any()
    assert (ids0[4:n] == e).any() and not torch.equal(out[0, 4:], base[0, 4:])


def test_where_callable_sees_phase_and_positions_in_generate():
    model = model_for("qwen3_moe")
    prompt = tokens(2, 5)
    _, trace = route(model, prompt)
    layer = trace.layers[0]
    e = often_chosen(trace, 0)
    calls = []

    def decode_only(input_ids, positions, phase):
        calls.append((phase, tuple(positions.shape), None if input_ids is None else tuple(input_ids.shape)))
        return torch.full(tuple(positions.shape), phase == "decode")

    with torch.no_grad(), mr.intervene(model, ablate={layer: [e]}, where=decode_only), mr.capture(model) as rec:
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    t = rec.trace()
    phase = t.labels["phase"]
    assert calls[0][0] == "prefill" and {c[0] for c in calls[1:]} == {"decode"} and len(calls) == 4
    assert not (t.expert_ids[phase == "decode", 0] == e).any()
    assert np.array_equal(t.expert_ids[phase == "prefill"], trace.expert_ids)


def test_generate_decode_steps_are_rerouted_and_padding_works():
    model = model_for("qwen3_moe")
    ids = tokens(2, 6)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding on row 0
    _, trace = route(model, ids, attention_mask=mask)
    layer, e = trace.layers[-1], often_chosen(trace, -1)
    with torch.no_grad(), mr.intervene(model, ablate={layer: [e]}), mr.capture(model) as rec:
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    t = rec.trace()
    assert (t.labels["phase"] == "decode").sum() == 2 * 4
    assert not (t.expert_ids[:, -1] == e).any()
    # the padded row equals the same prompt alone, intervened
    with torch.no_grad(), mr.intervene(model, ablate={layer: [e]}):
        alone = model.generate(ids[:1, 2:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[0, 2:], alone[0])


def test_where_tensor_past_its_width_is_not_intervened_in_decode():
    model = model_for("qwen3_moe")
    prompt = tokens(1, 5)
    layer = moe(model)[0].layer
    with torch.no_grad(), mr.capture(model) as rec:
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    plain = rec.trace()
    e = often_chosen(plain, 0)
    mask = torch.ones(1, 5, dtype=torch.bool)  # the prompt only
    with torch.no_grad(), mr.intervene(model, ablate={layer: [e]}, where=mask), mr.capture(model) as rec:
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    t = rec.trace()
    assert not (t.expert_ids[:5, 0] == e).any()


# ---------------------------------------------------------------------------------------------- 6. cleanliness and errors
def test_nothing_remains_after_the_block_also_after_an_exception():
    model = model_for("qwen3_moe")
    ids = tokens()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hooks_of(model)
    with torch.no_grad():
        base = model(ids).logits
    layer = moe(model)[0].layer
    with pytest.raises(RuntimeError, match="boom"), mr.intervene(
            model, ablate={layer: [0, 1]}, force={layer: [2]}, bias={layer: {3: 1.0}}):
        assert hooks_of(model) != hooks
        raise RuntimeError("boom")
    for mode in ("zero", "renormalize"):
        with mr.intervene(model, ablate={layer: [0]}, mode=mode), torch.no_grad():
            model(ids)
    assert hooks_of(model) == hooks
    assert not hasattr(model, "_moe_routing_intervening")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_failing_forward_inside_the_block_leaves_nothing():
    model = model_for("qwen3_moe")
    hooks = hooks_of(model)
    layer = moe(model)[0].layer
    bad = torch.zeros(3, dtype=torch.bool)[None].expand(2, 3)  # batch 2 mask, called with batch 3
    with pytest.raises(InterventionError, match="batch"), mr.intervene(model, ablate={layer: [0]}, where=bad), \
            torch.no_grad():
        model(tokens(3, 3))
    assert hooks_of(model) == hooks


@pytest.mark.parametrize("kwargs, match", [
    ({"ablate": {1: [0]}}, r"not MoE layers.*MoE layers: \[0, 2\]"),  # layer 1 is dense
    ({"ablate": {7: [0]}}, "not MoE layers"),
    ({"ablate": {0: [8]}}, "expert 8 does not exist"),
    ({"ablate": {0: [-1]}}, "does not exist"),
    ({"ablate": {0: 3}}, "list of expert ids"),
    ({"ablate": {0: [0]}, "mode": "drop"}, "mode must be one of"),
    ({"force": {0: [0, 1, 2]}}, "force at most 2"),
    ({"ablate": {0: list(range(7))}}, "ban at most 6"),
    ({"ablate": {0: [1]}, "force": {0: [1]}}, "both forced and ablated"),
    ({"bias": {0: {1: float("inf")}}}, "finite number"),
    ({"bias": {0: [1]}}, "dict"),
    ({"ablate": [0]}, "dict"),
    ({"ablate": {0: [0]}, "where": torch.ones(2, 3)}, "bool"),
    ({"ablate": {0: [0]}, "where": "all"}, "callable"),
])
def test_bad_requests_raise_project_errors(kwargs, match):
    model = model_for("qwen3_moe")
    hooks = hooks_of(model)
    with pytest.raises(InterventionError, match=match), mr.intervene(model, **kwargs):
        pass
    assert hooks_of(model) == hooks
    assert issubclass(InterventionError, MoERoutingError) and issubclass(InterventionError, CaptureError)


def test_nested_intervene_is_refused():
    model = model_for("qwen3_moe")
    with mr.intervene(model, ablate={0: [0]}), pytest.raises(InterventionError, match="already inside"), \
            mr.intervene(model, ablate={0: [1]}):
        pass


def test_where_callable_with_wrong_shape_is_refused():
    model = model_for("qwen3_moe")
    with pytest.raises(InterventionError, match=r"bool tensor of shape \[batch, seq\]"), mr.intervene(
            model, ablate={0: [0]}, where=lambda **kw: torch.ones(1, dtype=torch.bool)), torch.no_grad():
        model(tokens())


def test_a_router_that_the_rule_does_not_reproduce_is_refused():
    """A patched router (weights doubled) no longer matches softmax_topk: re-selection refuses, zero still works."""
    model = copy.deepcopy(model_for("qwen3_moe"))
    router = moe(model)[0].router
    plain = router.forward

    def doubled(hidden_states):
        logits, w, idx = plain(hidden_states)
        return logits, w * 2, idx

    router.forward = doubled
    with pytest.raises(InterventionError, match="does not reproduce"), mr.intervene(model, ablate={0: [0]}), \
            torch.no_grad():
        model(tokens())
    with mr.intervene(model, ablate={0: [0]}, mode="zero"), torch.no_grad():
        model(tokens())


def test_unsupported_family_is_refused_naming_family_and_mode():
    family = next(f for f in ("phimoe", "ernie4_5_moe", "deepseek_v2") if f not in RULES)
    model = ac.build(ac.ARCHS[family])
    layer = moe(model)[0].layer
    with pytest.raises(InterventionError, match=rf"{family}.*'reroute'"), mr.intervene(model, ablate={layer: [0]}):
        pass
    with pytest.raises(InterventionError, match=rf"{family}.*'force'"), mr.intervene(model, force={layer: [0]}):
        pass
