"""capture() never returns a silently short trace: torch.compile, packed rows, wrapped models (issue 14: 1, 6, 11).

Real transformers models (tiny qwen3_moe, MoE layers 0 and 2) compiled for real with torch.compile on CPU
(backend "eager" / "aot_eager": dynamo's graph capture and hook handling are the same as with inductor, which
takes minutes here; see README "Capturing a compiled model").
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_qwen3_moe
from moe_routing.capture import capture
from moe_routing.errors import CompiledModelError, IncompleteCaptureError, WrappedModelError
from test_capture import batch, n_hooks


@pytest.fixture
def fresh_dynamo():
    """Every test starts and ends without compiled graphs in the process (dynamo's cache is process-wide)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def reference(seed: int, ids: torch.Tensor, mask: torch.Tensor, calls: int = 1):
    """The trace of an uncompiled model with the same weights: what a compiled capture must equal."""
    model = make_qwen3_moe(seed=seed)
    with capture(model) as rec, torch.no_grad():
        for _ in range(calls):
            model(input_ids=ids, attention_mask=mask)
    return rec.trace()


def assert_same(trace, ref):
    assert trace.num_tokens == ref.num_tokens
    np.testing.assert_array_equal(trace.doc_ids, ref.doc_ids)
    np.testing.assert_array_equal(trace.positions, ref.positions)
    np.testing.assert_array_equal(trace.token_ids, ref.token_ids)
    np.testing.assert_array_equal(trace.expert_ids, ref.expert_ids)
    np.testing.assert_allclose(trace.weights, ref.weights, rtol=1e-5, atol=1e-6)


def compiled_graphs(model: nn.Module) -> int:
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(type(model).forward.__code__))


# ---------------------------------------------------------------------------------------------- 1. torch.compile
def test_model_compiled_and_warmed_before_capture_records_every_token(fresh_dynamo):
    ids, mask = batch(seed=3)
    ref = reference(1, ids, mask, calls=2)
    model = make_qwen3_moe(seed=1)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask)  # warm-up: the cached graph has no hooks
    assert compiled_graphs(model) > 0
    with pytest.warns(UserWarning, match="compiled with torch.compile before capture"), capture(compiled) as rec, \
            torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)  # the model inside the wrapper is the same capture
    assert_same(rec.trace(), ref)
    assert n_hooks(model) == 0


def test_capture_of_a_model_called_through_a_separate_compiled_wrapper(fresh_dynamo):
    ids, mask = batch(seed=4)
    ref = reference(1, ids, mask)
    model = make_qwen3_moe(seed=1)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask)
    with capture(model) as rec, torch.no_grad():  # hooks on the model; the user calls the wrapper made earlier
        compiled(input_ids=ids, attention_mask=mask)
    assert_same(rec.trace(), ref)


def test_per_module_compile_before_capture(fresh_dynamo):
    ids, mask = batch(seed=5)
    ref = reference(2, ids, mask)
    model = make_qwen3_moe(seed=2)
    for layer in model.model.layers:
        layer.compile(backend="eager")  # in place: module._compiled_call_impl
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    with pytest.warns(UserWarning, match="compiled"), capture(model) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert_same(rec.trace(), ref)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_hooks_first_then_compile_runs_compiled_graphs_and_records_everything(fresh_dynamo, backend):
    """The documented recipe: enter capture, then compile; the compiled graphs run and every token is recorded."""
    ids, mask = batch(seed=6)
    ref = reference(3, ids, mask, calls=2)
    model = make_qwen3_moe(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing compiled before capture: no warning, no forced eager mode
        with capture(model) as rec, torch.no_grad():
            compiled = torch.compile(model, backend=backend)
            compiled(input_ids=ids, attention_mask=mask)
            compiled(input_ids=ids, attention_mask=mask)  # the second call reuses the graph made with hooks
    assert compiled_graphs(model) > 0  # compiled code really ran
    assert_same(rec.trace(), ref)
    calls = rec.num_calls
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask)  # after the block the graph no longer records
    assert rec.num_calls == calls and n_hooks(model) == 0


def test_hooks_first_then_compile_after_another_instance_was_compiled(fresh_dynamo):
    """A graph compiled for another instance of the class is reused and would skip the hooks: still complete."""
    ids, mask = batch(seed=7)
    ref = reference(4, ids, mask)
    other = torch.compile(make_qwen3_moe(seed=9), backend="eager")
    with torch.no_grad():
        other(input_ids=ids, attention_mask=mask)
    model = make_qwen3_moe(seed=4)
    with capture(model) as rec, torch.no_grad():
        torch.compile(model, backend="eager")(input_ids=ids, attention_mask=mask)
    assert_same(rec.trace(), ref)


def test_a_forward_that_skips_the_hooks_raises(fresh_dynamo):
    ids, mask = batch(seed=8)
    model = make_qwen3_moe(seed=5)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask)
    with pytest.warns(UserWarning), capture(compiled) as rec, torch.no_grad(), \
            torch.compiler.set_stance("default"), \
            pytest.raises(CompiledModelError, match=r"ran without the hooks.*enter capture"):
        compiled(input_ids=ids, attention_mask=mask)  # the user re-enabled the cached graph inside the block
    with pytest.raises(Exception, match="nothing was captured"):
        rec.trace()


def test_a_compiled_function_around_the_model_is_caught_by_the_token_check(fresh_dynamo):
    """No hook fires at all (the compiled step inlines the model): check_recorded (used per batch) raises."""
    ids, mask = batch(seed=9)
    model = make_qwen3_moe(seed=6)
    step = torch.compile(lambda i, a: model(input_ids=i, attention_mask=a), backend="eager")
    with torch.no_grad():
        step(ids, mask)
    with capture(model) as rec, torch.no_grad():
        before = rec.tokens_recorded
        step(ids, mask)
        with pytest.raises(IncompleteCaptureError, match="ran without the hooks"):
            rec.check_recorded(before, int(mask.sum()))
        before = rec.tokens_recorded
        model(input_ids=ids, attention_mask=mask)
        rec.check_recorded(before, int(mask.sum()))  # an ordinary forward passes the check


def test_capture_corpus_with_a_model_compiled_before(fresh_dynamo, tokenizer, tmp_path):
    """The issue's case: texts and labels land on the right documents, every planned token is written."""
    import moe_routing as mr

    texts = ["The quick brown fox jumps.", "Der schnelle braune Fuchs.", "Le renard brun saute.",
             "The lazy dog sleeps all day long.", "Быстрая лиса.", "敏捷的棕色狐狸跳过了懒狗。"]
    langs = ["en", "de", "fr", "en", "ru", "zh"]
    kw = dict(batch_size=2, labels={"lang": langs}, progress=False, batches_per_shard=2)
    ref = mr.capture_corpus(make_qwen3_moe(seed=7), tokenizer, texts, tmp_path / "ref", **kw).read()
    model = make_qwen3_moe(seed=7)
    compiled = torch.compile(model, backend="eager", dynamic=True)  # one graph for every batch shape
    with torch.inference_mode():  # warmed like capture_corpus calls it: inference tensors, batch of 2, a mask
        warm = tokenizer(texts[:2], return_tensors="pt", padding=True)
        compiled(input_ids=warm["input_ids"], attention_mask=warm["attention_mask"])
    with pytest.warns(UserWarning, match="compiled"):
        got = mr.capture_corpus(compiled, tokenizer, texts, tmp_path / "compiled", **kw).read()
    assert got.num_tokens == ref.num_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    np.testing.assert_array_equal(got.labels["lang"], ref.labels["lang"])
    np.testing.assert_array_equal(got.labels["text_index"], ref.labels["text_index"])
    np.testing.assert_array_equal(got.token_ids, ref.token_ids)
    np.testing.assert_array_equal(got.expert_ids, ref.expert_ids)


# ---------------------------------------------------------------------------------------------- 6. packed rows
def test_packed_rows_split_documents_at_position_resets(qwen3_moe):
    """Several documents per row (position_ids restart, no mask): one document per run, true positions."""
    lengths = [(4, 3, 5), (6, 6)]
    width = 12
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 300, (2, width), generator=g)
    pos = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    with capture(qwen3_moe) as rec, torch.no_grad():
        qwen3_moe(input_ids=ids, position_ids=pos)
    t = rec.trace(labels={"doc": ["a", "b", "c", "d", "e"]})
    assert t.num_tokens == 24
    np.testing.assert_array_equal(t.doc_ids, [0] * 4 + [1] * 3 + [2] * 5 + [3] * 6 + [4] * 6)
    np.testing.assert_array_equal(t.positions, pos.reshape(-1).numpy())
    np.testing.assert_array_equal(t.labels["doc"], np.repeat(list("abcde"), [4, 3, 5, 6, 6]))
    np.testing.assert_array_equal(t.token_ids, ids.reshape(-1).numpy())
    # an all-ones mask beside packed position_ids splits the same way
    with capture(qwen3_moe) as rec, torch.no_grad():
        qwen3_moe(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos)
    np.testing.assert_array_equal(rec.trace().doc_ids, t.doc_ids)
    # ordinary rows (positions continue) stay one document each, also with left padding
    ids2, mask2 = batch(seed=2)
    with capture(qwen3_moe) as rec, torch.no_grad():
        qwen3_moe(input_ids=ids2, attention_mask=mask2,
                  position_ids=(mask2.cumsum(1) - 1).clamp(min=0))
    np.testing.assert_array_equal(rec.trace().doc_ids, [0] * 6 + [1] * 4)


# ---------------------------------------------------------------------------------------------- 11. wrapped models
class Component(nn.Module):
    """A bridge component as TransformerLens builds them: the original module is a child named _original_component."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self._original_component = original

    def forward(self, *args, **kwargs):
        return self._original_component(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the model reads from its layers (attention_type, ...)
            return getattr(super().__getattr__("_original_component"), name)


class Bridge(nn.Module):
    """TransformerLens's TransformerBridge layout: the HF model in __dict__ (not a submodule), its blocks replaced
    by components that hold the original blocks, and a forward of its own that takes ``input``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__dict__["original_model"] = model
        for i, layer in enumerate(model.model.layers):
            layer.mlp = Component(layer.mlp)
            model.model.layers[i] = Component(layer)
        self.blocks = nn.ModuleList(list(model.model.layers))

    def forward(self, input: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.__dict__["original_model"](input_ids=input, attention_mask=attention_mask).logits


def test_a_bridge_wrapped_model_is_found_and_captured():
    ids, mask = batch(seed=12)
    ref = reference(8, ids, mask)
    bridge = Bridge(make_qwen3_moe(seed=8))
    with capture(bridge) as rec, torch.no_grad():
        bridge(ids, attention_mask=mask)
    assert_same(rec.trace(), ref)
    assert n_hooks(bridge.original_model) == 0


def test_a_wrapper_without_a_transformers_model_is_named_in_the_error(qwen3_moe):
    class Holder(nn.Module):
        def __init__(self, layers: nn.Module) -> None:
            super().__init__()
            self.layers = layers  # the decoder layers without their model: nothing to unwrap

    with pytest.raises(WrappedModelError, match=r"test_capture_reliability\.Holder.*pass the transformers model"), \
            capture(Holder(nn.ModuleList([nn.Linear(2, 2)]))):
        pass


def test_a_real_transformer_lens_bridge(tokenizer):
    """Runs where TransformerLens is installed (not a project dependency): its bridge around a tiny qwen3_moe."""
    source = pytest.importorskip("transformer_lens.model_bridge.sources.transformers.source")

    def build():
        model = make_qwen3_moe(seed=0, mlp_only_layers=())  # TransformerLens bridges all-MoE qwen3_moe only
        model.config.architectures = ["Qwen3MoeForCausalLM"]
        return model

    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    plain = build()
    with capture(plain) as rec, torch.no_grad():
        plain(input_ids=ids)
    bridge = source.boot("tiny-qwen3-moe", hf_model=build(), tokenizer=tokenizer, load_weights=False)
    with capture(bridge) as got, torch.no_grad():
        bridge(ids)
    assert_same(got.trace(), rec.trace())
