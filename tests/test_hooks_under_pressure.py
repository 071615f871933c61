"""Hooks under pressure: thousands of batches, repeated captures, errors inside the block."""

import gc
import tracemalloc

import pytest
import torch

import moe_routing as mr


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_thousands_of_batches_no_growth_of_memory_or_hooks(qwen3_moe):
    ids = torch.randint(2, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    base_hooks = _hook_count(qwen3_moe)
    with torch.inference_mode(), mr.capture(qwen3_moe) as rec:
        hooks_inside = _hook_count(qwen3_moe)
        for _ in range(200):  # warm up allocator and caches
            qwen3_moe(input_ids=ids)
        rec.trace(clear=True)
        gc.collect()
        tracemalloc.start()
        first = None
        for i in range(2000):
            qwen3_moe(input_ids=ids)
            if i % 100 == 99:
                assert rec.trace(clear=True).num_tokens == 100 * ids.numel()
                gc.collect()
                current = tracemalloc.get_traced_memory()[0]
                first = current if first is None else first
        last = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert _hook_count(qwen3_moe) == hooks_inside
    assert last - first < 256 * 1024, f"Python memory grew by {(last - first) / 1024:.0f} KiB over 1900 batches"
    assert _hook_count(qwen3_moe) == base_hooks


def test_repeated_captures_and_errors_leave_the_model_as_before(qwen3_moe):
    ids = torch.randint(2, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = qwen3_moe(input_ids=ids).logits
        state = {k: v.clone() for k, v in qwen3_moe.state_dict().items()}
        base = _hook_count(qwen3_moe)
        for _ in range(50):
            with mr.capture(qwen3_moe, logits=True) as rec:
                qwen3_moe(input_ids=ids)
            assert rec.trace().num_tokens == 6
        with pytest.raises(ZeroDivisionError), mr.capture(qwen3_moe):
            qwen3_moe(input_ids=ids)
            1 / 0  # noqa: B018
        assert _hook_count(qwen3_moe) == base
        from moe_routing.capture import _CAPTURING

        assert qwen3_moe not in _CAPTURING  # the block's bookkeeping is released (nothing set on the model)
        assert not [k for k in vars(qwen3_moe) if 'moe_routing' in k]
        assert torch.equal(qwen3_moe(input_ids=ids).logits, ref)
        assert all(torch.equal(v, state[k]) for k, v in qwen3_moe.state_dict().items())
        with mr.capture(qwen3_moe) as rec:  # usable again after the error
            qwen3_moe(input_ids=ids)
        assert rec.trace().num_tokens == 6


def test_an_adapter_that_matches_no_experts_module_gets_a_clear_error(qwen3_moe):
    """A custom adapter pointed at the router instead of the experts: refused before any hook is installed."""
    wrong = mr.Adapter("custom", experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp\.gate$", reading="experts_args")
    ids = torch.randint(2, 300, (1, 4))
    with (pytest.raises(mr.UnsupportedModelError, match="no experts modules matched the 'custom' adapter"),
          torch.inference_mode(), mr.capture(qwen3_moe, adapter=wrong)):
        qwen3_moe(input_ids=ids)
    assert _hook_count(qwen3_moe) == 0
