"""routing_stability on a tiny real Qwen3-MoE: fp32 routing does not depend on the batch, the shares equal an
independent recomputation, and the model comes back in its own dtype with its exact weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import moe_routing as mr
from moe_routing.errors import MetricError
from moe_routing.metrics import routing_stability, stability_summary
from moe_routing.metrics.stability import STABILITY_COLUMNS

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Der Fuchs", "Le renard brun saute.",
         "Быстрая коричневая лиса прыгает.", "敏捷的棕色狐狸", "fox", "The lazy dog.", "Der schnelle braune Fuchs"]


def _capture(model, tokenizer, texts, size, side):
    tokenizer.padding_side = side
    try:
        with torch.inference_mode(), mr.capture(model) as rec:
            for i in range(0, len(texts), size):
                model(**tokenizer(texts[i:i + size], return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = "right"
    return rec.trace()


@pytest.fixture(scope="module")
def frame(qwen3_moe, tokenizer):
    return routing_stability(qwen3_moe, tokenizer, TEXTS, batch_sizes=(1, 4), dtypes=("float32", "bfloat16"))


def test_frame_layout(frame, qwen3_moe, tokenizer):
    assert list(frame.columns) == list(STABILITY_COLUMNS)
    layers = sorted(frame["layer"].unique())
    assert layers == [0, 2]  # layer 1 of the fixture is dense
    # per dtype: batch 1 once, batch 4 on each side
    assert len(frame) == 2 * (1 + 2) * len(layers)
    assert set(frame["padding_side"]) == {"none", "right", "left"}
    n = int(sum(len(tokenizer(t)["input_ids"]) for t in TEXTS))
    assert (frame["tokens"] == n).all()
    batch1 = frame[frame["batch_size"] == 1]
    assert (batch1["top1_changed"] == 0).all() and (batch1["topk_changed"] == 0).all()
    fp32 = frame[frame["dtype"] == "float32"]
    assert (fp32["top1_vs_fp32"][fp32["batch_size"] == 1] == 0).all()
    summary = stability_summary(frame)
    assert len(summary) == 6 and set(summary["dtype"]) == {"float32", "bfloat16"}


def test_float32_routing_does_not_depend_on_the_batch(frame):
    fp32 = frame[frame["dtype"] == "float32"]
    assert (fp32["topk_changed"] == 0).all() and (fp32["top1_changed"] == 0).all()
    assert (fp32["max_weight_diff"] < 1e-5).all()


def test_shares_equal_an_independent_recomputation(frame, qwen3_moe, tokenizer):
    half = copy.deepcopy(qwen3_moe).to(torch.bfloat16)  # a copy: the session's model stays float32 as it was
    ref = _capture(half, tokenizer, TEXTS, 1, "right")
    got = _capture(half, tokenizer, TEXTS, 4, "left")
    fp32 = _capture(qwen3_moe, tokenizer, TEXTS, 1, "right")
    rows = frame[(frame["dtype"] == "bfloat16") & (frame["batch_size"] == 4) & (frame["padding_side"] == "left")]
    for j, layer in enumerate(ref.layers):
        row = rows[rows["layer"] == layer].iloc[0]
        top1 = np.mean(got.top1()[:, j] != ref.top1()[:, j])
        def sets(t, j=j):
            return np.sort(t.expert_ids[:, j], axis=1)

        topk = np.mean((sets(got) != sets(ref)).any(axis=1))
        vs32 = np.mean((sets(got) != sets(fp32)).any(axis=1))
        assert row["top1_changed"] == pytest.approx(top1)
        assert row["topk_changed"] == pytest.approx(topk)
        assert row["topk_vs_fp32"] == pytest.approx(vs32)


def test_model_is_restored_bit_for_bit(tokenizer):
    from conftest import make_qwen3_moe

    model = make_qwen3_moe(seed=3).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = routing_stability(model, tokenizer, TEXTS[:4], batch_sizes=(2,), padding_sides=("left",))
    assert set(out["dtype"]) == {"bfloat16", "float32"}  # default: the model's dtype and float32
    after = model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())


def test_bad_input(qwen3_moe, tokenizer):
    with pytest.raises(MetricError, match="at least one text"):
        routing_stability(qwen3_moe, tokenizer, [])
    with pytest.raises(MetricError, match="padding_sides"):
        routing_stability(qwen3_moe, tokenizer, TEXTS, padding_sides=("middle",))
    with pytest.raises(MetricError, match="unknown dtype"):
        routing_stability(qwen3_moe, tokenizer, TEXTS, dtypes=("int8",))
    with pytest.raises(MetricError, match="batch sizes"):
        routing_stability(qwen3_moe, tokenizer, TEXTS, batch_sizes=(0,))


def test_the_model_comes_back_bit_identical(tokenizer):
    """float32 -> bfloat16 -> float32 rounds weights and buffers; routing_stability must undo that exactly, and
    leave a mixed-dtype model (a float32 router beside bfloat16 experts) mixed as it was."""
    from conftest import make_qwen3_moe

    model = make_qwen3_moe(seed=3)
    model.model.layers[0].mlp.experts.to(torch.bfloat16)
    before = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    before = {k: (v.dtype, v.detach().clone()) for k, v in before.items()}
    routing_stability(model, tokenizer, TEXTS[:3], batch_sizes=(1, 2), dtypes=("float32", "bfloat16"))
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert set(after) == set(before)
    for k, (dtype, value) in before.items():
        assert after[k].dtype == dtype, k
        assert torch.equal(after[k], value), k
