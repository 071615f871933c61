"""Every MoE family transformers 5.24 ships, built tiny from its real classes: capture is exact and causal.

For each family (``arch_configs.ARCH_LIST``) the checks are:

1. exactness: the trace equals what the experts received, read by this file's own hooks (not the library's);
2. causality: zeroing one expert changes, right after the first MoE block, exactly the tokens routed to it;
3. no side effects: logits bit-identical with capture on/off; no hook left behind, also after an exception;
4. padding: left- and right-padded batches give the same trace for the real tokens; pads never counted;
5. generate(): prefill and decode steps, phase labels and true positions (representative families);
6. trace.layers / num_experts / top_k follow the config's rule; ``logits=True`` gives the router output.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import arch_configs as ac
from moe_routing.capture import capture
from moe_routing.errors import UnsupportedModelError

FAMILIES = [a.model_type for a in ac.ARCH_LIST if not a.skip]
ALL_FAMILIES = [a.model_type for a in ac.ARCH_LIST]
GENERATE_FAMILIES = [a.model_type for a in ac.ARCH_LIST if a.generate]
# families whose routing this file reads from somewhere other than an experts module taking (hidden, index, weights)
ROUTER_PROBED = {"llama4_text", "jetmoe", "doge"}
LOGITS_OUTPUT = {"llama4_text": 1, "jetmoe": 4, "switch_transformers": 2}  # router output holding the logits
SEQ = 7


# ---------------------------------------------------------------------------------------------- models and inputs
@functools.cache
def model_for(model_type: str) -> nn.Module:
    arch = ac.ARCHS[model_type]
    if arch.skip:
        pytest.skip(arch.skip)
    return ac.build(arch)


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, ac.VOCAB, (batch, seq), generator=g)


def padded(lengths: tuple[int, ...], side: str, seed: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sequences (lengths given) padded to the longest, on the left or on the right."""
    seqs = [tokens(1, n, seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = s
        mask[i, sl] = 1
    return ids, mask


def call_kwargs(model_type: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    kw = {"input_ids": ids}
    if mask is not None:
        kw["attention_mask"] = mask
    if model_type == "switch_transformers":
        kw["decoder_input_ids"] = ids[:, :3]
    return kw


def main_output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no logits in {type(out).__name__}")


def run(model_type: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model_for(model_type)(**call_kwargs(model_type, ids, mask)))


# ---------------------------------------------------------------------------------------------- independent probes
def _layer_of(name: str) -> int:
    m = re.search(r"(?:^|\.)(?:layers|blocks|block|h)\.(\d+)\.", name + ".")
    assert m, name
    return int(m.group(1))


def _positional(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def experts_modules(model: nn.Module, model_type: str) -> dict[int, list[tuple[str, nn.Module]]]:
    """Experts modules called as experts(hidden, index, weights), by decoder layer (found by class, not adapter)."""
    out: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("Experts") or len(_positional(module)) < 3:
            continue
        if model_type == "switch_transformers" and not name.startswith("encoder."):
            continue
        out[_layer_of(name)].append((name, module))
    return dict(out)


def routers(model: nn.Module, model_type: str) -> dict[int, tuple[str, nn.Module]]:
    """The router next to each MoE layer's experts (a sibling whose class is a Router / Gate / Gating)."""
    out = {}
    if model_type in ("jetmoe", "doge"):
        for name, module in model.named_modules():
            if model_type == "jetmoe" and name.endswith("mlp.router"):
                out[_layer_of(name)] = (name, module)
            if model_type == "doge" and name.endswith("mlp.router_gate"):
                out[_layer_of(name)] = (name, module)
        return out
    if model_type == "llama4_text":
        return {_layer_of(n): (n, m) for n, m in model.named_modules() if type(m).__name__ == "Llama4Router"}
    for layer, found in experts_modules(model, model_type).items():
        for name, _ in found:
            parent_name = name.rsplit(".", 1)[0]
            for child, module in model.get_submodule(parent_name).named_children():
                if re.search(r"(Router|Gate|Gating)$", type(module).__name__) and layer not in out:
                    out[layer] = (f"{parent_name}.{child}", module)
    return out


class Probe:
    """This file's own reading of what each MoE layer's experts received, one dict per forward call.

    ``calls[i][layer] = (ids [rows, k], weights [rows, k] or None)`` over the flattened batch (row = b * S + s).
    ``sets`` says the reading has no slot order (compare per token as sets).
    """

    def __init__(self, model: nn.Module, model_type: str):
        self.model, self.model_type = model, model_type
        self.calls: list[dict[int, tuple[np.ndarray, np.ndarray | None]]] = []
        self.expert_sizes: dict[int, list[int]] = {}
        self.handles = []
        self.sets = model_type in ("llama4_text", "jetmoe")

    def __enter__(self) -> Probe:
        top = self.model.register_forward_pre_hook(lambda *_: self.calls.append({}))
        self.handles.append(top)
        mt = self.model_type
        if mt == "llama4_text":
            for layer, (_, router) in routers(self.model, mt).items():
                self.handles.append(router.register_forward_hook(self._llama4(layer)))
        elif mt == "jetmoe":
            for layer, (name, router) in routers(self.model, mt).items():
                self.handles.append(router.layer.register_forward_hook(self._topk_softmax(layer, router.top_k)))
                mlp = self.model.get_submodule(name.rsplit(".", 1)[0])
                self.handles.append(mlp.input_linear.register_forward_pre_hook(self._jetmoe_sizes(layer)))
        elif mt == "doge":
            for name, module in self.model.named_modules():
                if name.endswith("mlp.down_embed"):
                    self.handles.append(module.register_forward_pre_hook(self._doge(_layer_of(name))))
        else:
            for layer, found in experts_modules(self.model, mt).items():
                for _, module in found:
                    sig = inspect.signature(module.forward)
                    self.handles.append(module.register_forward_pre_hook(self._experts(layer, sig),
                                                                         with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _put(self, layer: int, ids: torch.Tensor, w: torch.Tensor | None) -> None:
        assert layer not in self.calls[-1], f"layer {layer} routed twice in one forward"
        self.calls[-1][layer] = (ids.detach().cpu().numpy().astype(np.int64),
                                 None if w is None else w.detach().cpu().float().numpy())

    def _experts(self, layer: int, sig: inspect.Signature):
        def hook(module, args, kwargs):
            values = list(sig.bind(*args, **kwargs).arguments.values())
            index, weights = values[1], values[2]
            if self.model_type == "switch_transformers":  # one-hot [T, 1, E] after the capacity mask
                onehot = index.reshape(index.shape[0], -1)
                routed = onehot.sum(-1) > 0
                ids = torch.where(routed, onehot.argmax(-1), torch.full_like(routed, -1, dtype=torch.long))[:, None]
                self._put(layer, ids, torch.where(routed[:, None], weights.reshape(-1, 1).float(), 0.0))
                return None
            index = index.reshape(-1, index.shape[-1])
            weights = weights.reshape(index.shape[0], -1)
            if self.model_type == "zaya":  # skip slot: arrives as expert 0 with weight 0
                index = torch.where(weights == 0, torch.full_like(index, -1), index)
            self._put(layer, index, weights)
            return None

        return hook

    def _llama4(self, layer: int):
        def hook(module, args, output):
            scores = output[0]  # dense [T, E]: 0 outside the chosen experts
            k = module.top_k
            chosen = scores > 0
            assert bool((chosen.sum(-1) == k).all()), "llama4 scores are not exactly k non-zero per token"
            ids = torch.nonzero(chosen)[:, 1].reshape(-1, k)
            self._put(layer, ids, scores.gather(-1, ids))

        return hook

    def _topk_softmax(self, layer: int, k: int):
        def hook(module, args, output):
            logits = output.float()
            values, ids = logits.topk(k, dim=-1)
            self._put(layer, ids, torch.softmax(values, dim=-1))

        return hook

    def _jetmoe_sizes(self, layer: int):
        def hook(module, args):
            self.expert_sizes[layer] = list(args[1])

        return hook

    def _doge(self, layer: int):
        def hook(module, args):
            self._put(layer, args[0].reshape(-1, args[0].shape[-1]), None)

        return hook


def canon(ids: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    order = np.argsort(ids, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), None if w is None else np.take_along_axis(w, order, -1)


def pad_k(a: np.ndarray, k: int, fill) -> np.ndarray:
    if a.shape[1] == k:
        return a
    out = np.full((a.shape[0], k), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def assert_same_routing(arch: ac.Arch, ids_a, w_a, ids_b, w_b, *, exact: bool, sets: bool, what=""):
    """Same ids (per token as sets when ``sets``: a reading without slot order, or topk(sorted=False) compared
    across two forwards) and the same weights (bit-exact, or within float tolerance)."""
    if sets:
        ids_a, w_a = canon(ids_a, w_a)
        ids_b, w_b = canon(ids_b, w_b)
    np.testing.assert_array_equal(ids_a, ids_b, err_msg=f"{arch.model_type}: expert ids differ {what}")
    if w_a is None or w_b is None:
        return
    if exact:
        np.testing.assert_array_equal(w_a, w_b, err_msg=f"{arch.model_type}: weights differ {what}")
    else:
        np.testing.assert_allclose(w_a, w_b, rtol=1e-4, atol=1e-5, err_msg=f"{arch.model_type}: weights {what}")


# ---------------------------------------------------------------------------------------------- 1. exactness
@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_exactness(model_type):
    arch = ac.ARCHS[model_type]
    model = model_for(model_type)
    ids, mask = padded((SEQ, 4), "left")
    with Probe(model, model_type) as probe, capture(model) as rec, torch.no_grad():
        model(**call_kwargs(model_type, ids, mask))
    trace = rec.trace()
    (seen,) = probe.calls
    assert sorted(seen) == list(trace.layers), f"experts routed in layers {sorted(seen)}, trace has {trace.layers}"
    keep = mask.reshape(-1).bool().numpy()
    assert len(trace.doc_ids) == keep.sum()
    k = trace.expert_ids.shape[2]
    for j, layer in enumerate(trace.layers):
        p_ids, p_w = seen[layer]
        p_ids, p_w = pad_k(p_ids[keep], k, -1), None if p_w is None else pad_k(p_w[keep], k, 0.0)
        assert_same_routing(arch, trace.expert_ids[:, j].astype(np.int64), trace.weights[:, j], p_ids, p_w,
                            exact=not probe.sets, sets=probe.sets, what=f"in layer {layer}")
    if model_type == "jetmoe":  # the experts' own dispatch sizes agree with the captured ids (padding included)
        with Probe(model, model_type) as probe, capture(model) as rec, torch.no_grad():
            model(input_ids=ids)
        full = rec.trace()
        for j, layer in enumerate(full.layers):
            counts = np.bincount(full.expert_ids[:, j].ravel(), minlength=trace.num_experts)
            assert counts.tolist() == probe.expert_sizes[layer]
    if model_type == "doge":  # weights are the block's own softmax over its top-k key pairs
        np.testing.assert_allclose(trace.weights.sum(-1), 1.0, rtol=1e-5)


def test_special_readings_are_exercised():
    """The tiny configs really hit the corner cases the special readings exist for."""
    def trace_of(model_type, ids=None):
        model = model_for(model_type)
        ids = tokens(2, 16, seed=5) if ids is None else ids
        with capture(model) as rec, torch.no_grad():
            model(**call_kwargs(model_type, ids))
        return rec.trace()

    switch = trace_of("switch_transformers")
    assert (switch.expert_ids == -1).any(), "capacity 1 dropped no token"
    assert (switch.weights[switch.expert_ids == -1] == 0).all()
    longcat = trace_of("longcat_flash")
    assert (longcat.expert_ids >= ac.tiny_config(ac.ARCHS["longcat_flash"]).n_routed_experts).any(), \
        "no token routed to a zero-expert"
    hunyuan = trace_of("hunyuan_v1_moe")
    assert (hunyuan.expert_ids[:, 1, 1] == -1).all() and (hunyuan.expert_ids[:, 0, 1] >= 0).all()
    zaya = trace_of("zaya", tokens(4, 16, seed=7))
    assert (zaya.expert_ids == -1).any(), "no zaya token took the skip class"


# ---------------------------------------------------------------------------------------------- 2. causality
def moe_block(model: nn.Module, model_type: str, layer: int) -> tuple[nn.Module, Callable[[int], list]]:
    """The MoE block of ``layer`` (whose output we compare) and a function giving expert e's weight tensors."""
    if model_type == "jetmoe":
        mlp = model.get_submodule(routers(model, model_type)[layer][0].rsplit(".", 1)[0])
        return mlp, lambda e: [mlp.input_linear.weight[e], mlp.output_linear.weight[e]]
    if model_type == "doge":
        mlp = model.get_submodule(routers(model, model_type)[layer][0].rsplit(".", 1)[0])
        return mlp, lambda e: [mlp.down_embed.weight[e], mlp.up_embed.weight[e]]
    if model_type == "llama4_text":
        block = model.get_submodule(routers(model, model_type)[layer][0].rsplit(".", 1)[0])
        experts = block.experts
    else:
        (name, experts), = experts_modules(model, model_type)[layer][:1]
        block = model.get_submodule(name.rsplit(".", 1)[0])

    def tensors(e: int) -> list[torch.Tensor]:
        if isinstance(experts, (nn.ModuleDict, nn.ModuleList)):
            sub = experts[f"expert_{e}"] if isinstance(experts, nn.ModuleDict) else experts[e]
            return list(sub.parameters())
        n = int(getattr(experts, "num_experts", None) or getattr(experts, "num_routed_experts", 0))
        sizes = {n, int(getattr(experts, "total_experts", n))}
        out = []
        for p in experts.parameters():
            if p.shape[0] in sizes:
                out.append(p[e])
            elif p.shape[0] % n == 0:  # dbrx: experts stacked along dim 0 as [E * ffn, hidden]
                out.append(p.view(n, -1, *p.shape[1:])[e])
        return out

    return block, tensors


@pytest.mark.parametrize("model_type", FAMILIES)
def test_causality(model_type):
    model = model_for(model_type)
    ids = tokens(2, SEQ, seed=21)
    outputs = []

    def grab(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        outputs.append(out.detach().reshape(ids.numel(), -1).clone())

    with capture(model) as rec, torch.no_grad():
        model(**call_kwargs(model_type, ids))
    trace = rec.trace()
    layer = trace.layers[0]
    block, expert_tensors = moe_block(model, model_type, layer)
    routed = trace.expert_ids[:, 0]
    counts = np.bincount(routed[routed >= 0].ravel(), minlength=trace.num_experts)
    n_real = len(counts) if model_type != "longcat_flash" else ac.tiny_config(ac.ARCHS[model_type]).n_routed_experts
    expert = int(np.argmax(counts[:n_real]))
    assert counts[expert] > 0
    tensors = expert_tensors(expert)
    assert tensors, "found no weights of the expert to zero"
    saved = [t.detach().clone() for t in tensors]
    handle = block.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(**call_kwargs(model_type, ids))
            for t in tensors:
                t.zero_()
            model(**call_kwargs(model_type, ids))
    finally:
        handle.remove()
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)
    before, after = outputs
    changed = set(np.flatnonzero(~(before == after).all(dim=1).numpy()).tolist())
    expected = set(np.flatnonzero((routed == expert).any(axis=1)).tolist())
    assert changed == expected, (
        f"{model_type}: zeroing expert {expert} of layer {layer} changed tokens {sorted(changed)}; the trace "
        f"routed {sorted(expected)} to it")


# ---------------------------------------------------------------------------------------------- 3. no side effects
def hook_state(model: nn.Module) -> list:
    state = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            d = getattr(m, attr, None)
            if d:
                state.append((name, attr, tuple(d)))
    return state


@pytest.mark.parametrize("model_type", FAMILIES)
def test_no_side_effects(model_type):
    model = model_for(model_type)
    ids, mask = padded((SEQ, 5), "right")
    before = hook_state(model)
    plain = run(model_type, ids, mask)
    with capture(model, logits=True) as rec:
        captured = run(model_type, ids, mask)
        assert hook_state(model) != before
    assert torch.equal(plain, captured), f"{model_type}: logits changed under capture"
    assert rec.trace().expert_ids.shape[0] == int(mask.sum())
    assert hook_state(model) == before
    with pytest.raises(RuntimeError, match="raised inside"), capture(model, logits=True):
        run(model_type, ids, mask)
        raise RuntimeError("raised inside the block")
    assert hook_state(model) == before
    bad = ids.clone()
    bad[0, 0] = 10**6  # out of vocabulary: the model itself raises mid-forward
    with pytest.raises((IndexError, RuntimeError)), capture(model):
        run(model_type, bad, mask)
    assert hook_state(model) == before
    assert torch.equal(run(model_type, ids, mask), plain)


# ---------------------------------------------------------------------------------------------- 4. padding
PADDING_SKIPS = {
    "doge": "DogeCDMoE reshapes router logits [B, S, 2K] to [2, B*S, K], mixing rows across the batch: a token's "
            "routing depends on the other tokens (and the padding) of its batch, by design of the model",
}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_padding(model_type):
    if model_type in PADDING_SKIPS:
        pytest.skip(PADDING_SKIPS[model_type])
    arch = ac.ARCHS[model_type]
    model = model_for(model_type)
    lengths = (SEQ, 4, 6)
    saved = {}
    if model_type == "switch_transformers":  # capacity counts pads of the sequence: padding legitimately re-drops
        for name, m in model.named_modules():
            if hasattr(m, "expert_capacity"):
                saved[name], m.expert_capacity = m.expert_capacity, 10**6
    traces = {}
    try:
        for side in ("left", "right"):
            ids, mask = padded(lengths, side)
            with capture(model) as rec, torch.no_grad():
                model(**call_kwargs(model_type, ids, mask))
            traces[side] = rec.trace()
            real = ids[mask.bool()].numpy()
            assert len(traces[side].token_ids) == sum(lengths)
            np.testing.assert_array_equal(traces[side].token_ids, real)
            np.testing.assert_array_equal(traces[side].positions, np.concatenate([np.arange(n) for n in lengths]))
            np.testing.assert_array_equal(traces[side].doc_ids, np.repeat(np.arange(len(lengths)), lengths))
    finally:
        for name, cap in saved.items():
            model.get_submodule(name).expert_capacity = cap
    left, right = traces["left"], traces["right"]
    assert left.layers == right.layers
    for j in range(len(left.layers)):
        assert_same_routing(arch, left.expert_ids[:, j], left.weights[:, j], right.expert_ids[:, j],
                            right.weights[:, j], exact=False, sets=arch.unsorted_topk or model_type in ROUTER_PROBED,
                            what=f"between left and right padding, layer {left.layers[j]}")


# ---------------------------------------------------------------------------------------------- 5. generate()
@pytest.mark.parametrize("model_type", GENERATE_FAMILIES)
def test_generate(model_type):
    arch = ac.ARCHS[model_type]
    model = model_for(model_type)
    ids, mask = padded((6, 3), "left", seed=7)
    new = 3
    with Probe(model, model_type) as probe, capture(model) as rec, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    trace = rec.trace()
    phase = trace.labels["phase"]
    n_prompt = int(mask.sum())
    assert (phase[:n_prompt] == "prefill").all() and (phase[n_prompt:] == "decode").all()
    assert len(phase) == n_prompt + 2 * (new - 1)  # the last generated token is never fed back
    assert len(probe.calls) == new
    # prefill: real prompt tokens at their true positions; decode: one token per row per step
    np.testing.assert_array_equal(trace.positions[:n_prompt], [*range(6), *range(3)])
    dec = slice(n_prompt, None)
    np.testing.assert_array_equal(trace.positions[dec], [6, 3, 7, 4])
    np.testing.assert_array_equal(trace.doc_ids[dec], [0, 1, 0, 1])
    np.testing.assert_array_equal(trace.token_ids[dec], out[:, ids.shape[1]: ids.shape[1] + new - 1].T.reshape(-1))
    # every step's capture equals what the experts received in that step
    keep = [mask.reshape(-1).bool().numpy(), np.ones(2, bool), np.ones(2, bool)]
    start = 0
    for call, kp in zip(probe.calls, keep, strict=True):
        rows = slice(start, start + int(kp.sum()))
        for j, layer in enumerate(trace.layers):
            p_ids, p_w = call[layer]
            assert_same_routing(arch, trace.expert_ids[rows, j].astype(np.int64), trace.weights[rows, j],
                                p_ids[kp], p_w[kp], exact=True, sets=False, what=f"in step {start} layer {layer}")
        start = rows.stop


# ---------------------------------------------------------------------------------------------- 6. layers, logits
@pytest.mark.parametrize("model_type", FAMILIES)
def test_layers_experts_and_logits(model_type):
    arch = ac.ARCHS[model_type]
    model = model_for(model_type)
    config = ac.tiny_config(arch)
    ids = tokens(2, 5, seed=3)
    router_out = {}
    handles = [r.register_forward_hook(lambda m, a, o, layer=layer: router_out.__setitem__(layer, o))
               for layer, (_, r) in routers(model, model_type).items()]
    try:
        with capture(model, logits=True) as rec, torch.no_grad():
            model(**call_kwargs(model_type, ids))
    finally:
        for h in handles:
            h.remove()
    trace = rec.trace()
    assert list(trace.layers) == ac.expected_moe_layers(arch, config)
    assert trace.num_experts == ac.expected_num_experts(arch, config)
    assert trace.expert_ids.shape[2] == ac.expected_top_k(arch, config)
    assert trace.expert_ids.max() < trace.num_experts
    logits = trace.router_logits
    assert logits is not None and logits.shape[:2] == (ids.numel(), len(trace.layers))
    if model_type == "doge":  # the per-expert key-pair sums [T, num_keys^2], replayed from the router gate
        assert logits.shape[2] == trace.num_experts
        return
    for j, layer in enumerate(trace.layers):
        raw = router_out[layer]
        raw = raw[LOGITS_OUTPUT.get(model_type, 0)] if isinstance(raw, tuple) else raw
        raw = raw.reshape(ids.numel(), -1).float().numpy().astype(np.float16)
        np.testing.assert_array_equal(logits[:, j, : raw.shape[1]], raw)
        assert np.isnan(logits[:, j, raw.shape[1]:]).all()
    if model_type == "zaya":  # one column per expert plus the skip class
        assert logits.shape[2] == trace.num_experts + 1


# ---------------------------------------------------------------------------------------------- 7. refusals
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_dense_model_refused(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UnsupportedModelError) as err, capture(model):
        pass
    msg = str(err.value)
    assert repr(model_type) in msg and "dense" in msg
    for family in ("qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss"):
        assert family in msg
    assert hook_state(model) == []


def test_nllb_moe_is_refused_while_transformers_ignores_its_routing():
    arch = ac.ARCHS["nllb-moe"]
    model = ac.build(arch)
    mlp = model.encoder.layers[1].ffn
    ran = set()
    handles = [sub.register_forward_hook(lambda m, a, o, name=name: ran.add(name)) for name, sub in mlp.experts.items()]
    with torch.no_grad():
        ids = tokens(2, 12, seed=4)
        model(input_ids=ids, decoder_input_ids=ids[:, :3])
    for h in handles:
        h.remove()
    if ran <= {"expert_0", "expert_1"}:
        with pytest.raises(UnsupportedModelError), capture(model):
            pass
        pytest.skip(arch.skip)
    pytest.fail(f"nllb-moe now runs experts {sorted(ran)}: its routing may be readable; add an adapter row")


def test_multimodal_patterns_keep_to_the_text_decoder():
    """In full multimodal models, a second MoE stack (talker, vision tower) must not collide with the decoder's."""
    from moe_routing.adapters import ADAPTERS

    cases = {
        "qwen3_omni_moe": (["thinker.model.language_model.layers.1.mlp.experts", "layers.1.mlp.experts"],
                           ["talker.model.layers.1.mlp.experts", "talker.code_predictor.model.layers.0.mlp.experts"]),
        "dots3_note": (["model.language_model.layers.2.mlp.experts"], ["model.vision_tower.blocks.3.mlp.experts"]),
        "ernie4_5_vl_moe": (["model.language_model.layers.1.mlp.text_moe.experts"],
                            ["model.language_model.layers.1.mlp.vision_moe.experts"]),
    }
    for family, (kept, dropped) in cases.items():
        pattern = re.compile(ADAPTERS[family].experts)
        assert all(pattern.search(n) for n in kept), family
        assert not any(pattern.search(n) for n in dropped), family
