"""capture() behaviour not tied to one family, on a tiny qwen3_moe (MoE layers 0 and 2, layer 1 dense)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import make_qwen3_moe
from moe_routing.capture import capture
from moe_routing.errors import CaptureError

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(getattr(m, d, {}) or {}) for m in model.modules() for d in HOOK_DICTS)


def batch(seed: int = 0, lengths=(6, 4)):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 300, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def traced(model, **kw):
    ids, mask = batch()
    with capture(model, **kw) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return rec.trace()


def test_nested_capture_is_refused_and_the_outer_one_keeps_working(qwen3_moe):
    ids, mask = batch()
    with capture(qwen3_moe) as outer:
        hooks = n_hooks(qwen3_moe)
        with pytest.raises(CaptureError, match="already inside a capture"), capture(qwen3_moe):
            pass
        assert n_hooks(qwen3_moe) == hooks  # the refused inner call neither added nor removed hooks
        with torch.no_grad():
            qwen3_moe(input_ids=ids, attention_mask=mask)
    assert outer.trace().expert_ids.shape[0] == int(mask.sum())
    assert n_hooks(qwen3_moe) == 0
    with capture(qwen3_moe):  # the model is usable again after the outer block
        pass


def test_layers_subset(qwen3_moe):
    full = traced(qwen3_moe)
    assert full.layers == (0, 2)
    only = traced(qwen3_moe, layers=[2])
    assert only.layers == (2,)
    np.testing.assert_array_equal(only.expert_ids[:, 0], full.expert_ids[:, 1])
    np.testing.assert_array_equal(only.weights[:, 0], full.weights[:, 1])
    with pytest.raises(CaptureError, match=r"layers \[1\] are not MoE layers.*\[0, 2\]"), capture(qwen3_moe, layers=[1]):
        pass
    assert n_hooks(qwen3_moe) == 0


def test_labels_expand_per_document_across_calls(qwen3_moe):
    ids, mask = batch()
    with capture(qwen3_moe) as rec, torch.no_grad():
        qwen3_moe(input_ids=ids, attention_mask=mask)  # documents 0, 1
        qwen3_moe(input_ids=ids[:1, :3])  # document 2
    n = int(mask.sum()) + 3
    trace = rec.trace(labels={"lang": ["en", "de", "fr"], "tok": np.arange(n)})
    np.testing.assert_array_equal(trace.doc_ids, [0] * 6 + [1] * 4 + [2] * 3)
    np.testing.assert_array_equal(trace.labels["lang"], ["en"] * 6 + ["de"] * 4 + ["fr"] * 3)
    np.testing.assert_array_equal(trace.labels["tok"], np.arange(n))
    with pytest.raises(CaptureError, match="one per document"):
        rec.trace(labels={"lang": ["en", "de"]})


def test_warns_for_a_model_compiled_before_capture():
    ids, mask = batch()
    model = make_qwen3_moe(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an uncompiled model: no warning
        with capture(model):
            pass
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask)
    with pytest.warns(UserWarning, match="compiled with torch.compile before capture"), capture(compiled):
        pass
    inplace = make_qwen3_moe(seed=2)
    inplace.compile(backend="eager")
    with pytest.warns(UserWarning, match="compiled"), capture(inplace):
        pass
    assert n_hooks(model) == 0 and n_hooks(inplace) == 0


def test_hooks_back_to_zero_and_never_return_a_value(qwen3_moe):
    ids, mask = batch()
    returned = []
    assert n_hooks(qwen3_moe) == 0
    with capture(qwen3_moe, logits=True) as rec:
        assert n_hooks(qwen3_moe) > 0
        for m in qwen3_moe.modules():  # wrap every installed hook to see what it returns
            for d in (m._forward_hooks, m._forward_pre_hooks):
                for key, fn in list(d.items()):
                    def wrapped(*args, _fn=fn, **kwargs):
                        out = _fn(*args, **kwargs)
                        returned.append(out)
                        return out

                    d[key] = wrapped
        with torch.no_grad():
            qwen3_moe(input_ids=ids, attention_mask=mask)
    assert returned and all(r is None for r in returned)
    assert rec.trace().router_logits.shape == (int(mask.sum()), 2, 8)
    assert n_hooks(qwen3_moe) == 0
    with pytest.raises(ValueError, match="boom"), capture(qwen3_moe, logits=True):
        raise ValueError("boom")
    assert n_hooks(qwen3_moe) == 0
    from moe_routing.capture import _CAPTURING

    assert qwen3_moe not in _CAPTURING  # the block's bookkeeping is released (nothing set on the model)
    assert not [k for k in vars(qwen3_moe) if 'moe_routing' in k]


def test_inputs_embeds_only_call(qwen3_moe):
    ids, mask = batch()
    by_ids = traced(qwen3_moe)
    embeds = qwen3_moe.get_input_embeddings()(ids).detach()
    with capture(qwen3_moe) as rec, torch.no_grad():
        qwen3_moe(inputs_embeds=embeds, attention_mask=mask)
    by_embeds = rec.trace()
    np.testing.assert_array_equal(by_embeds.expert_ids, by_ids.expert_ids)
    np.testing.assert_array_equal(by_embeds.weights, by_ids.weights)
    np.testing.assert_array_equal(by_embeds.positions, by_ids.positions)
    assert (by_embeds.token_ids == -1).all()
    with capture(qwen3_moe) as rec, torch.no_grad():
        qwen3_moe(inputs_embeds=embeds[:1, :4])  # no mask at all: every row is a real token
    assert len(rec.trace().doc_ids) == 4


def test_generate_without_attention_mask_has_true_positions_and_phases(qwen3_moe):
    """transformers 5.x generate() passes `cache=` and position_ids and no mask: decode steps continue documents."""
    ids = torch.randint(2, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), capture(qwen3_moe) as rec:
        qwen3_moe.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    t = rec.trace()
    assert t.num_tokens == 2 * 5 + 2 * 3  # the last generated token is never fed back
    decode = t.labels["phase"] == "decode"
    assert decode.sum() == 6
    assert sorted(set(t.doc_ids.tolist())) == [0, 1]
    for d in (0, 1):
        assert t.positions[t.doc_ids == d].tolist() == list(range(8))
