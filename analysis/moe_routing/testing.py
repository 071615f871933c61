"""Helpers for testing code that uses moe_routing (and for the project's own tests).

- :func:`assert_traces_equal`: like ``numpy.testing.assert_array_equal`` for two :class:`RoutingTrace` objects;
  the AssertionError says which arrays or labels differ, where, and shows the first differing entries.
- :func:`synthetic_trace`: a seeded random trace with labels (``lang``, ``domain``, ``phase``, ``pair``) whose
  routing can depend on the language and the token (``skew``, ``lang_bias``): no model needed.
- :func:`tiny_tokenizer`, :func:`tiny_moe`: a real byte-level BPE tokenizer trained in milliseconds and a tiny
  random model of a real transformers MoE class (``tiny_moe("deepseek_v3")``), seeded, float32, eval mode.
- :data:`ROUTING_SHAPES` and :func:`routing_proxy`: models with the routing shape of real large MoE models
  (layers x experts x top-k, dense layers, groups, shared experts) but tiny hidden sizes, saved as local model
  directories with a tokenizer, so the whole pipeline runs on them as on the real model::

      path = routing_proxy("qwen3-30b-a3b", tmp_path / "qwen3-30b")   # 48 MoE layers x 128 experts, top-8
      mr.demo_pipeline.demo_runs(str(path), tmp_path / "runs", parts=("heldout",), max_per_lang=4)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MoERoutingError
from .trace import RoutingTrace

__all__ = [
    "ROUTING_SHAPES",
    "TINY_BASE",
    "TINY_FAMILIES",
    "assert_traces_equal",
    "proxy_config",
    "routing_proxy",
    "synthetic_trace",
    "tiny_config",
    "tiny_moe",
    "tiny_tokenizer",
]

# ---------------------------------------------------------------------------------------------- comparison
_ARRAYS = ("expert_ids", "weights", "token_ids", "positions", "doc_ids")


def _diff_array(name: str, a: np.ndarray, b: np.ndarray, *, rtol: float, atol: float, show: int) -> str | None:
    """A description of how ``a`` and ``b`` differ, or None when they are equal (NaN equals NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"{name}: shape {a.shape} != {b.shape}"
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        af, bf = a.astype(np.float64), b.astype(np.float64)
        same = np.isclose(af, bf, rtol=rtol, atol=atol, equal_nan=True) if (rtol or atol) else (
            (af == bf) | (np.isnan(af) & np.isnan(bf)))
    else:
        same = a == b
    bad = np.argwhere(~np.asarray(same, dtype=bool))
    if not len(bad):
        return None
    lines = [f"{name}: {len(bad)} of {a.size} entries differ (shape {a.shape})"]
    for where in bad[:show]:
        idx = tuple(int(i) for i in where)
        lines.append(f"    at {idx}: {a[idx]!r} != {b[idx]!r}")
    if len(bad) > show:
        lines.append(f"    ... and {len(bad) - show} more")
    return "\n".join(lines)


def assert_traces_equal(a: RoutingTrace, b: RoutingTrace, *, rtol: float = 0.0, atol: float = 0.0,
                        check_model_name: bool = False, check_meta: bool = False, show: int = 5) -> None:
    """Raise ``AssertionError`` listing every difference between two traces (same as ``a.equals(b)`` when exact).

    Compares the shape facts (``layers``, ``num_experts``, ``top_k``, token count), the arrays ``expert_ids``,
    ``weights``, ``token_ids``, ``positions``, ``doc_ids``, ``router_logits`` and every label (names and values).
    ``rtol``/``atol`` loosen the float comparisons (weights, logits); NaN equals NaN. The message names each
    array or label that differs, how many entries, and the first ``show`` of them as ``at (token, layer, slot)``.
    """
    if not isinstance(a, RoutingTrace) or not isinstance(b, RoutingTrace):
        raise TypeError(f"assert_traces_equal compares two RoutingTrace objects, got {type(a).__name__} and "
                        f"{type(b).__name__}.")
    problems: list[str] = []
    for fact in ("layers", "num_experts", "top_k", "num_tokens"):
        if getattr(a, fact) != getattr(b, fact):
            problems.append(f"{fact}: {getattr(a, fact)!r} != {getattr(b, fact)!r}")
    if check_model_name and a.model_name != b.model_name:
        problems.append(f"model_name: {a.model_name!r} != {b.model_name!r}")
    if check_meta and a.meta != b.meta:
        keys = sorted(k for k in set(a.meta) | set(b.meta) if a.meta.get(k) != b.meta.get(k))
        problems.append("meta differs at keys " + ", ".join(
            f"{k!r} ({a.meta.get(k, '<missing>')!r} != {b.meta.get(k, '<missing>')!r})" for k in keys))
    for name in _ARRAYS:
        tol = (rtol, atol) if name == "weights" else (0.0, 0.0)
        d = _diff_array(name, getattr(a, name), getattr(b, name), rtol=tol[0], atol=tol[1], show=show)
        if d:
            problems.append(d)
    if (a.router_logits is None) != (b.router_logits is None):
        problems.append(f"router_logits: {'present' if a.router_logits is not None else 'absent'} in the first, "
                        f"{'present' if b.router_logits is not None else 'absent'} in the second")
    elif a.router_logits is not None and b.router_logits is not None:
        d = _diff_array("router_logits", a.router_logits, b.router_logits, rtol=rtol, atol=atol, show=show)
        if d:
            problems.append(d)
    only_a, only_b = sorted(set(a.labels) - set(b.labels)), sorted(set(b.labels) - set(a.labels))
    if only_a or only_b:
        problems.append(f"labels: only in the first {only_a}, only in the second {only_b}")
    for key in sorted(set(a.labels) & set(b.labels)):
        d = _diff_array(f"label {key!r}", a.labels[key], b.labels[key], rtol=0.0, atol=0.0, show=show)
        if d:
            problems.append(d)
    if problems:
        raise AssertionError("traces differ:\n  " + "\n  ".join(p.replace("\n", "\n  ") for p in problems))


# ---------------------------------------------------------------------------------------------- synthetic
def synthetic_trace(
    n_docs: int = 12,
    doc_len: int | tuple[int, int] = (20, 60),
    *,
    layers: Sequence[int] = (1, 3, 4),
    num_experts: int = 8,
    top_k: int = 2,
    langs: Sequence[str] = ("en", "de", "ja"),
    vocab: int = 30,
    token_cycle: Sequence[int] | None = None,
    doc_ids: Sequence[int] | None = None,
    skew: float = 0.0,
    lang_bias: Mapping[str, Mapping[int, float]] | None = None,
    shuffle_slots: bool = False,
    empty_frac: float = 0.0,
    weights: bool = True,
    logits: bool = False,
    float32_scores: bool = False,
    labels: Sequence[str] = ("lang", "domain", "phase", "pair"),
    seed: int = 0,
    model_name: str = "synthetic",
) -> RoutingTrace:
    """A seeded random trace ``[tokens, layers, top_k]``: each token's experts are its ``top_k`` highest scores.

    Documents: ``n_docs`` of ``doc_len`` tokens (an int, or ``(low, high)`` drawn per document), with ids
    ``doc_ids`` (default ``0..n_docs-1``) and languages ``langs`` in turn. Scores are standard normal per
    (token, layer, expert); ``skew`` adds to the expert ``index of the language % num_experts`` and to the expert
    ``token id % num_experts`` (routing then depends on language and token); ``lang_bias`` adds
    ``{lang: {expert: amount}}``. Weights are the softmax of the chosen experts' scores (descending, or in a
    random slot order with ``shuffle_slots``; ``float32_scores`` draws the scores in float32); ``empty_frac`` empties that share of slots (id -1, weight 0);
    ``weights=False`` leaves them out (NaN); ``logits=True`` stores the scores as float16 router logits.
    Token ids are random in ``[0, vocab)``, or ``token_cycle`` repeated in every document.

    Labels (per token, those named in ``labels``): ``lang``; ``domain`` (``web`` / ``code`` by document); ``phase`` (``think`` in the
    first half of a document, ``answer`` after); ``pair`` (documents ``i, i + 1, ...`` of the same round of
    languages share it: a parallel-sentence id).
    """
    if n_docs < 1 or num_experts < 1 or not 1 <= top_k <= num_experts or not layers or not langs:
        raise MoERoutingError(f"synthetic_trace needs n_docs >= 1, layers, langs and 1 <= top_k <= num_experts; "
                              f"got n_docs={n_docs}, layers={list(layers)}, langs={list(langs)}, "
                              f"top_k={top_k}, num_experts={num_experts}.")
    rng = np.random.default_rng(seed)
    if isinstance(doc_len, int):
        lens = np.full(n_docs, doc_len, dtype=np.int64)
    else:
        lens = rng.integers(doc_len[0], doc_len[1] + 1, size=n_docs)
    n = int(lens.sum())
    docs = np.arange(n_docs) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
    if len(docs) != n_docs:
        raise MoERoutingError(f"doc_ids names {len(docs)} documents, expected n_docs={n_docs}.")
    positions = np.concatenate([np.arange(m) for m in lens]).astype(np.int32)
    lang = np.repeat(np.array([langs[i % len(langs)] for i in range(n_docs)]), lens)
    domain = np.repeat(np.array(["web", "code"])[np.arange(n_docs) % 2], lens)
    phase = np.where(positions < np.repeat(lens // 2, lens), "think", "answer")
    pair = np.repeat(np.arange(n_docs) // len(langs), lens)
    if token_cycle is None:
        token_ids = rng.integers(0, vocab, size=n).astype(np.int32)
    else:
        cycle = np.asarray(token_cycle, dtype=np.int32)
        token_ids = np.concatenate([np.resize(cycle, m) for m in lens]).astype(np.int32)
    scores = rng.normal(size=(n, len(layers), num_experts))
    if float32_scores:
        scores = scores.astype(np.float32)
    if skew:
        lang_code = np.searchsorted(np.array(sorted(langs)), lang)
        scores[np.arange(n), :, lang_code % num_experts] += skew
        scores[np.arange(n), :, token_ids % num_experts] += skew
    for which, bias in (lang_bias or {}).items():
        for expert, amount in bias.items():
            scores[lang == which, :, int(expert)] += amount
    ids = np.argsort(-scores, axis=2, kind="stable")[:, :, :top_k]
    chosen = np.take_along_axis(scores, ids, axis=2)
    w = np.exp(chosen - chosen.max(axis=2, keepdims=True))
    w = w / w.sum(axis=2, keepdims=True)
    if shuffle_slots:
        perm = np.argsort(rng.random((n, len(layers), top_k)), axis=2)
        ids = np.take_along_axis(ids, perm, axis=2)
        w = np.take_along_axis(w, perm, axis=2)
    if empty_frac:
        empty = rng.random(ids.shape) < empty_frac
        ids = np.where(empty, -1, ids)
        w = np.where(empty, 0.0, w)
    return RoutingTrace.from_arrays(
        ids,
        w.astype(np.float32) if weights else None,
        layers=tuple(layers),
        num_experts=num_experts,
        labels={k: v for k, v in {"lang": lang, "domain": domain, "phase": phase, "pair": pair}.items()
                if k in labels},
        token_ids=token_ids,
        doc_ids=np.repeat(docs, lens),
        positions=positions,
        router_logits=scores.astype(np.float16) if logits else None,
        model_name=model_name,
    )


# ---------------------------------------------------------------------------------------------- tiny models
TOKENIZER_TEXTS = (
    "The quick brown fox jumps over the lazy dog.", "Der schnelle braune Fuchs springt.",
    "Le renard brun saute par-dessus le chien.", "Быстрая коричневая лиса прыгает.", "敏捷的棕色狐狸跳过了懒狗。",
)


def tiny_tokenizer(vocab_size: int = 300, texts: Sequence[str] | None = None) -> Any:
    """A real byte-level BPE tokenizer (``PreTrainedTokenizerFast``; ``<pad>`` id 0, ``<eos>`` id 1) trained in
    milliseconds on ``texts`` (default: five short sentences in five scripts). Byte level: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts or TOKENIZER_TEXTS) * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


#: Applied to the attributes a family's default config has (see ``tests/arch_configs.py`` for every family):
#: 2 layers, hidden 32, 8 experts, top-2, vocabulary 128, group routing 2 groups of 4.
TINY_BASE: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "top_k_experts": 2,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "sliding_window": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
    "shared_intermediate_size": 32, "dense_intermediate_size": 64, "moe_shared_expert_intermediate_size": 32,
    "n_group": 2, "topk_group": 1, "num_expert_group": 2,
}
_NONE_STAYS_NONE = {"q_lora_rank", "sliding_window", "head_dim", "n_group", "topk_group", "num_expert_group"}

#: Per-family overrides on top of ``TINY_BASE`` (families not listed get ``TINY_BASE`` alone).
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"num_hidden_layers": 3, "mlp_only_layers": [1]},
    "qwen2_moe": {"num_hidden_layers": 3, "decoder_sparse_step": 2},
    "deepseek_v3": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "num_key_value_heads": 4},
    "glm4_moe": {"num_hidden_layers": 3, "first_k_dense_replace": 1},
}

_SIZE_KEYS = ("hidden_size", "num_attention_heads")


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The tiny config of ``model_type``: ``TINY_BASE`` (where the family has the key), then
    ``TINY_FAMILIES[model_type]``, then ``overrides`` (a value of None removes a key: the family's default)."""
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(model_type).to_dict()
    except (KeyError, ValueError) as exc:
        raise MoERoutingError(f"tiny_moe: transformers knows no model_type {model_type!r} ({exc}); use a config "
                              "model_type such as 'qwen3_moe', 'deepseek_v3', 'mixtral' or 'gpt_oss'.") from None
    aliases = dict(getattr(type(AutoConfig.for_model(model_type)), "attribute_map", {}) or {})

    def canonical(values: Mapping[str, Any]) -> dict[str, Any]:  # num_experts -> num_local_experts, ...
        return {aliases.get(k, k): v for k, v in values.items()}

    kwargs: dict[str, Any] = canonical({k: v for k, v in TINY_BASE.items()
                                        if k in default and not (k in _NONE_STAYS_NONE and default[k] is None)})
    if "mlp_layer_types" in default:  # families that list dense/sparse per layer: one dense layer first
        kwargs.update(num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"])
    kwargs.update(canonical(TINY_FAMILIES.get(model_type, {})))
    overrides = canonical(overrides)
    kwargs.update(overrides)
    if any(k in overrides for k in _SIZE_KEYS) and "head_dim" in kwargs and "head_dim" not in overrides:
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    return AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if v is not None})


def tiny_moe(model_type: str = "qwen3_moe", *, seed: int = 0, model_class: str | None = None,
             **overrides: Any) -> Any:
    """A tiny random model of a real transformers MoE class (float32, eval mode, weights seeded by ``seed``).

    ``overrides`` are config attributes (``num_experts=16``, ``num_hidden_layers=4``, ...), applied over
    :func:`tiny_config`'s defaults; ``model_class`` names another transformers class (default
    ``AutoModelForCausalLM``).
    """
    import torch
    import transformers

    config = tiny_config(model_type, **overrides)
    cls: Any = getattr(transformers, model_class) if model_class else transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    return model.float().eval()


# ---------------------------------------------------------------------------------------------- proxies
#: Routing shapes of real models: (model_type, config attributes that set layers, experts, top-k, dense layers,
#: groups and shared experts). ``routing_proxy`` adds tiny hidden sizes.
ROUTING_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-30b-a3b": ("qwen3_moe", {"num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
                                    "mlp_only_layers": [], "norm_topk_prob": True}),
    "qwen3-235b-a22b": ("qwen3_moe", {"num_hidden_layers": 94, "num_experts": 128, "num_experts_per_tok": 8,
                                      "mlp_only_layers": [], "norm_topk_prob": True}),
    "deepseek-v3": ("deepseek_v3", {"num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256,
                                    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
                                    "n_shared_experts": 1, "norm_topk_prob": True, "num_key_value_heads": 4}),
    "mixtral-8x7b": ("mixtral", {"num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2}),
    "gpt-oss-120b": ("gpt_oss", {"num_hidden_layers": 36, "num_local_experts": 128, "num_experts_per_tok": 4}),
}


def proxy_config(name: str, *, hidden_size: int = 64, expert_size: int = 16, vocab_size: int = 512,
                 **overrides: Any) -> Any:
    """The config :func:`routing_proxy` builds: ``ROUTING_SHAPES[name]`` with tiny hidden sizes (no weights)."""
    if name not in ROUTING_SHAPES:
        raise MoERoutingError(f"no routing proxy {name!r}; known: {sorted(ROUTING_SHAPES)}.")
    model_type, shape = ROUTING_SHAPES[name]
    sizes: dict[str, Any] = {"hidden_size": hidden_size, "num_attention_heads": 4, "head_dim": hidden_size // 4,
                             "intermediate_size": expert_size, "moe_intermediate_size": expert_size,
                             "shared_expert_intermediate_size": expert_size, "vocab_size": vocab_size,
                             "max_position_embeddings": 512, "pad_token_id": 0, "eos_token_id": 1,
                             "bos_token_id": 1}  # tiny_tokenizer's <pad> and <eos>
    if model_type == "gpt_oss":  # YaRN rope: its own original context length; no position table to size
        sizes.pop("max_position_embeddings")
    if model_type == "deepseek_v3":  # multi-head latent attention sizes
        sizes.update(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                     head_dim=8)
    return tiny_config(model_type, **{**sizes, **shape, **overrides})


def routing_proxy(name: str, directory: str | os.PathLike, *, hidden_size: int = 64, expert_size: int = 16,
                  vocab_size: int = 512, seed: int = 0, **overrides: Any) -> Path:
    """Save a model with the routing shape ``ROUTING_SHAPES[name]`` and tiny hidden sizes to ``directory``.

    The directory holds ``config.json``, ``model.safetensors`` and a byte-level tokenizer (:func:`tiny_tokenizer`),
    so ``from_pretrained``, ``mr.load_model`` and the CLI read it like a downloaded model. Sizes: hidden
    ``hidden_size`` (4 heads), each expert (and dense MLP) ``expert_size`` wide; ``overrides`` change any config
    attribute. Returns ``directory``. The weights are random (seeded): routing shapes, not routing behaviour.
    On disk: about 80 MB for the Qwen3-30B shape, 190 MB for DeepSeek-V3 (float32).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = proxy_config(name, hidden_size=hidden_size, expert_size=expert_size, vocab_size=vocab_size,
                          **overrides)
    tokenizer = tiny_tokenizer(min(vocab_size, 400))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
