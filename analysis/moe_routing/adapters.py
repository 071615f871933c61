"""Where each transformers MoE family keeps its routing decisions: a declarative table, not code branches.

Every row says, for one ``model_type``:

- ``experts``: a regular expression matched against the end of ``model.named_modules()`` names; its group
  ``layer`` is the decoder-layer index. The default matches ``...layers.{i}.<block>.experts``.
- ``router``: the router's attribute name on the same parent module (for ``logits=True``).
- ``reading``: a ``readings.Reading`` value -- how the decisions are read (its hook kind, which module the pattern
  matches, its read function) and, for some families, the selection rule interventions replay. By name
  (``readings.READINGS``; a string is accepted and looked up there):
  ``experts_args``  forward pre-hook on the experts module, which receives ``(hidden[T,H], index[T,k],
                    weights[T,k])`` -- exactly what the model uses, whatever experts backend runs;
  ``onehot_capacity`` switch_transformers: the experts get a capacity-masked one-hot ``[T,1,E]``; an all-zero
                    row is a token dropped at capacity, recorded as expert ``-1``;
  ``router_scores`` llama4: the router returns dense scores ``[T,E]`` (0 outside the top-k) that multiply the
                    experts' input; ids are the router's own top-k of its logits, weights are the scores there;
  ``skip_zero_weight`` zaya: a "skip" slot arrives as index 0 with weight 0 and is recorded as ``-1``;
  ``jetmoe_sorted``  jetmoe: forward hook on the router, whose expert-sorted dispatch (sorted slot positions, gates,
                    expert sizes) is what the experts consume; it is scattered back to ``[T,k]``;
  ``doge_product_keys`` doge: forward hook on the DogeCDMoE block; its product-key top-k is replayed from the
                    router logits it returns (the same ops on the same tensor).
  No code branches on these names: ``find_moe_layers`` and ``capture`` read the Reading's fields.
- ``logits_output``: which output of the router module holds the raw router logits ``[T,E]``.
- ``num_experts_attrs``: config attributes whose sum is the number of ids a router can emit
  (longcat_flash adds its zero-experts, ids >= n_routed_experts).
- ``moe_layers``, ``shared_experts``, ``notes``: documentation (the config rule deciding which decoder layers are
  MoE -- the modules found are the truth --, where a shared expert sits, what is special). Capture reads none of
  them to decide anything; ``Recorder.adapter_facts`` hands them on with the recording (e.g. for a manifest).

Adding a family is adding a row (and, for a new way of reading, a ``Reading`` in ``readings.py``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UnsupportedModelError, WrappedModelError
from .readings import (
    DOGE_PRODUCT_KEYS,
    EXPERTS_ARGS,
    JETMOE_SORTED,
    MIXTRAL_SOFTMAX,
    ONEHOT_CAPACITY,
    READINGS,
    ROUTER_SCORES,
    RULES,
    SIGMOID_GROUP,
    SKIP_ZERO_WEIGHT,
    SOFTMAX_TOPK,
    TOPK_SOFTMAX,
    Reading,
)

DEFAULT_EXPERTS = r"(?:^|\.)(?:layers|h|blocks)\.(?P<layer>\d+)\.(?:mlp|feed_forward|block_sparse_moe|moe|ffn)\.experts$"
NUM_EXPERTS_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")


@dataclass(frozen=True)
class Adapter:
    """How to read one MoE family's routing (one row of the table)."""

    family: str
    experts: str = DEFAULT_EXPERTS
    router: str | None = "gate"
    reading: Reading = EXPERTS_ARGS  # a Reading (a name of readings.READINGS is accepted and looked up)
    logits_output: int | None = 0
    num_experts_attrs: tuple[str, ...] = ()
    moe_layers: str = "every decoder layer"  # documentation
    shared_experts: str | None = None  # documentation
    notes: str = ""  # documentation
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.reading, str):
            if self.reading not in READINGS:
                raise UnsupportedModelError(
                    f"adapter {self.family!r}: unknown reading {self.reading!r}; known: {', '.join(READINGS)} "
                    "(or pass a moe_routing.readings.Reading)."
                )
            object.__setattr__(self, "reading", READINGS[self.reading])
        elif not isinstance(self.reading, Reading):
            raise UnsupportedModelError(
                f"adapter {self.family!r}: reading must be a moe_routing.readings.Reading or one of "
                f"{', '.join(READINGS)}; got {type(self.reading).__name__}."
            )

    @property
    def facts(self) -> dict[str, Any]:
        """The row as plain values (for a manifest): family, reading, rule and the documentation fields."""
        return {"family": self.family, "reading": self.reading.name, "rule": self.reading.rule or None,
                "moe_layers": self.moe_layers, "shared_experts": self.shared_experts, "notes": self.notes}


def _rows(families: Iterable[str], **common: Any) -> list[Adapter]:
    return [Adapter(family=f, **common) for f in families]


_DS = "first_k_dense_replace dense layers first"
_MLP_TYPES = "mlp_layer_types[i] == 'sparse'"
_SPARSE_STEP = "not in mlp_only_layers and (i+1) % decoder_sparse_step == 0"
_BLOCK_BIAS = "sigmoid + block-owned bias -> top-k -> renormalise: not reproducible from logits"
_DS_NOTE = "sigmoid + e_score_correction_bias + group-limited top-k (sorted=False): not reproducible from logits"

ADAPTERS_LIST: list[Adapter] = [
    # --- flagship families -------------------------------------------------------------------------------------
    Adapter("qwen3_moe", reading=SOFTMAX_TOPK, moe_layers=_SPARSE_STEP,
            notes="softmax (fp32) -> top-k -> renormalise if norm_topk_prob"),
    Adapter("deepseek_v3", aliases=("kimi_k25",), reading=SIGMOID_GROUP, moe_layers=_DS,
            shared_experts="mlp.shared_experts", notes=_DS_NOTE),
    # --- softmax / linear top-k routers ------------------------------------------------------------------------
    Adapter("qwen2_moe", reading=SOFTMAX_TOPK, moe_layers=_SPARSE_STEP, shared_experts="mlp.shared_expert (sigmoid gate)"),
    Adapter("qwen3_next", moe_layers=_SPARSE_STEP, shared_experts="mlp.shared_expert (sigmoid gate)",
            notes="hybrid linear/full attention"),
    Adapter("qwen3_5_moe_text", aliases=("qwen3_5_moe",), shared_experts="mlp.shared_expert",
            notes="hybrid linear/full attention"),
    Adapter("qwen4_exp_text", aliases=("qwen4_exp",), shared_experts="mlp.shared_expert",
            notes="hybrid linear/indexed attention"),
    Adapter("qwen3_vl_moe", aliases=("qwen3_vl_moe_text",), moe_layers=_SPARSE_STEP,
            notes="text decoder of a vision-language model"),
    Adapter("qwen3_omni_moe", aliases=("qwen3_omni_moe_thinker", "qwen3_omni_moe_text"), moe_layers=_SPARSE_STEP,
            experts=r"^(?!talker\.)(?:[\w.]*\.)?layers\.(?P<layer>\d+)\.mlp\.experts$",
            notes="the thinker's text decoder; the talker (a second MoE decoder) is not captured"),
    *_rows(["mixtral", "minimax"], reading=MIXTRAL_SOFTMAX, notes="softmax -> top-k -> renormalise; weights fp32"),
    Adapter("minimax_m3_vl", aliases=("minimax_m3_vl_text",), moe_layers=_MLP_TYPES,
            shared_experts="mlp.shared_experts"),
    *_rows(["olmoe", "flex_olmo"], reading=SOFTMAX_TOPK, notes="softmax -> top-k, no renormalisation by default"),
    Adapter("jamba", router="router", moe_layers="i % expert_layer_period == expert_layer_offset",
            notes="softmax -> top-k, no renormalisation"),
    Adapter("hunyuan_v1_moe", shared_experts="mlp.shared_mlp",
            notes="top-k may be a per-layer list: layers with a smaller k leave their last slots -1"),
    Adapter("gpt_oss", router="router", reading=TOPK_SOFTMAX, notes="linear+bias -> top-k on logits -> softmax over k; "
            "use_kernels=True replaces the whole block and hooks cannot see it"),
    Adapter("openai_privacy_filter", router="router", notes="gpt_oss-style router in a token classifier"),
    *_rows(["granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa"], router="router",
           notes="top-k on logits -> softmax over k"),
    Adapter("phimoe", router="router", notes="sparsemixer top-2; samples in training mode (capture in eval)"),
    Adapter("dbrx", router="router", notes="experts receive 3-D hidden states; index/weights are [T,k]"),
    Adapter("aria", aliases=("aria_text",), router="router", shared_experts="mlp.shared_experts",
            notes="text decoder of a vision-language model"),
    Adapter("cohere2_moe", moe_layers=_MLP_TYPES),
    Adapter("flint", moe_layers=_SPARSE_STEP, shared_experts="mlp.shared_expert"),
    Adapter("kolibri1", shared_experts="mlp.shared_experts"),
    Adapter("laguna", moe_layers=_MLP_TYPES, shared_experts="mlp.shared_experts"),
    Adapter("lara_mini", shared_experts="mlp.shared_expert", notes="hybrid linear/full attention"),
    Adapter("mellum", moe_layers=_MLP_TYPES),
    Adapter("step3p7", aliases=("step3p5", "step3p7_text"), moe_layers=_MLP_TYPES,
            shared_experts="mlp.shared_experts"),
    Adapter("muse_spark", aliases=("muse_spark_text",), moe_layers=_MLP_TYPES,
            notes="experts run in a projected space (pre_expert_proj / post_expert_proj)"),
    Adapter("inkling", aliases=("inkling_text", "inkling_mm_model"), moe_layers=_MLP_TYPES,
            shared_experts="mlp.shared_experts"),
    Adapter("inkling2", aliases=("inkling2_text",)),
    Adapter("inkling2_loop", aliases=("inkling2_loop_text",),
            notes="looped layers run several passes per forward; each pass must route for a consistent trace"),
    # --- biased / grouped routers (never reproducible from logits alone) ----------------------------------------
    Adapter("deepseek_v2", moe_layers=_DS, shared_experts="mlp.shared_experts",
            notes="softmax -> greedy or group-limited top-k (sorted=False) -> x routed_scaling_factor"),
    Adapter("glm4_moe", reading=SIGMOID_GROUP, moe_layers=_DS, shared_experts="mlp.shared_experts", notes=_DS_NOTE),
    *_rows(["dots1", "mistral4"], moe_layers=_DS, shared_experts="mlp.shared_experts", notes=_DS_NOTE),
    Adapter("glm4v_moe", aliases=("glm4v_moe_text",), moe_layers=_DS, shared_experts="mlp.shared_experts",
            notes=_DS_NOTE),
    *_rows(["deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "kimi_linear", "exaone_moe", "mimo_v2_flash",
            "bailing_hybrid", "axk1", "axk2", "hy_v4", "beam"],
           moe_layers=_MLP_TYPES, shared_experts="mlp.shared_experts", notes=_DS_NOTE),
    Adapter("solar_open", shared_experts="mlp.shared_experts", notes=_DS_NOTE),
    Adapter("mistral_large4", aliases=("mistral_large4_text",), moe_layers=_MLP_TYPES,
            shared_experts="mlp.shared_experts", notes=_DS_NOTE),
    Adapter("glm5_next", aliases=("glm5_next_text",), moe_layers=_MLP_TYPES, shared_experts="mlp.shared_experts",
            notes=_DS_NOTE),
    Adapter("hy_v4_vl", aliases=("hy_v4_vl_text",), moe_layers=_MLP_TYPES, shared_experts="mlp.shared_experts",
            notes=_DS_NOTE),
    Adapter("deepseek_ocr2", aliases=("deepseek_ocr2_text",), moe_layers=_MLP_TYPES,
            shared_experts="mlp.shared_experts", notes=_DS_NOTE),
    Adapter("unlimited_ocr", aliases=("unlimited_ocr_text",), moe_layers=_MLP_TYPES,
            shared_experts="mlp.shared_experts", notes=_DS_NOTE),
    Adapter("dots3_note", aliases=("dots3_note_text",), moe_layers=_MLP_TYPES, shared_experts="mlp.shared_experts",
            experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp\.experts$",
            notes=_DS_NOTE + "; the vision tower's MoE blocks are not captured"),
    Adapter("deepseek_v4", moe_layers="mlp_layer_types: 'hash_moe' (token-id hash router) and 'moe'",
            shared_experts="mlp.shared_experts", notes=_DS_NOTE + "; hash layers route by token id"),
    Adapter("nemotron_h", experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.mixer\.experts$",
            moe_layers="layers whose block type is 'moe'", notes=_DS_NOTE),
    Adapter("ernie4_5_moe", moe_layers="moe_layer_start_index..end_index every moe_layer_interval",
            shared_experts="mlp.shared_experts", notes="softmax -> top-k on probs + bias -> unbiased, renorm"),
    Adapter("ernie4_5_vl_moe", aliases=("ernie4_5_vl_moe_text",),
            experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp\.text_moe\.experts$", moe_layers=_MLP_TYPES,
            notes="text decoder; modality-isolated experts: the text experts (mlp.text_moe) are captured, a batch "
                  "with vision tokens routes only its text tokens there and is refused"),
    Adapter("afmoe", router="router", moe_layers="num_dense_layers dense layers first",
            shared_experts="mlp.shared_experts", notes=_BLOCK_BIAS),
    Adapter("lfm2_moe", moe_layers="num_dense_layers dense layers first", notes=_BLOCK_BIAS),
    *_rows(["hy_v3", "minimax_m2"], notes=_BLOCK_BIAS),
    # --- special readings ---------------------------------------------------------------------------------------
    Adapter("llama4_text", aliases=("llama4",), router="router", reading=ROUTER_SCORES, logits_output=1,
            moe_layers="moe_layers / interleave_moe_layer_step", shared_experts="feed_forward.shared_expert",
            experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.feed_forward\.router$",
            notes="the router returns dense sigmoid scores (0 outside top-k) that scale the experts' input; "
                  "every expert runs on every token"),
    Adapter("switch_transformers", router="router", reading=ONEHOT_CAPACITY, logits_output=2,
            experts=r"(?:^|\.)encoder\.block\.(?P<layer>\d+)\.layer\.\d+\.mlp\.experts$",
            moe_layers="every encoder_sparse_step-th block (encoder stack captured)",
            notes="top-1 with a per-sequence capacity: dropped tokens are recorded as expert -1"),
    Adapter("zaya", reading=SKIP_ZERO_WEIGHT,
            notes="router also takes state from the previous layer; index E means skip (arrives as 0 with weight 0) "
                  "and is recorded as -1; router logits have E + 1 columns (the last one is skip)"),
    Adapter("longcat_flash", router="router", num_experts_attrs=("n_routed_experts", "zero_expert_num"),
            experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp\.experts$",
            notes="zero-experts: ids >= n_routed_experts are identity experts; the trace counts them as experts"),
    Adapter("gemma4_text", aliases=("gemma4",), router="router",
            experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.experts$", moe_layers="every layer when enable_moe_block",
            notes="router and experts sit on the decoder layer beside a dense MLP; router output 0 is "
                  "probabilities, not logits"),
    Adapter("diffusion_gemma_text", aliases=("diffusion_gemma",), router="router",
            experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.experts$",
            notes="gemma4-style router/experts on the text encoder's layers; router output 0 is probabilities"),
    Adapter("jetmoe", router="router", reading=JETMOE_SORTED, logits_output=4,
            experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp\.router$",
            notes="the router returns the expert-sorted dispatch (sorted positions, token index, gates, expert "
                  "sizes, logits) that the experts consume; ids/weights are scattered back to [T,k]. The "
                  "mixture-of-attention router (self_attention.experts.router) is not captured"),
    Adapter("doge", router=None, reading=DOGE_PRODUCT_KEYS, logits_output=1,
            experts=r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp$", moe_layers="every layer when is_moe",
            notes="product-key retrieval experts (DogeCDMoE): the block's own top-k over num_keys^2 key pairs is "
                  "replayed from its router logits; logits are the per-expert key-pair sums. The block reshapes "
                  "logits across the batch, so a token's routing depends on the other rows of the batch"),
]

ADAPTERS: dict[str, Adapter] = {}
for _row in ADAPTERS_LIST:
    for _name in (_row.family, *_row.aliases):
        ADAPTERS[_name] = _row
    if _row.reading.rule:  # the families interventions can re-select for (readings.RULES), from the table
        RULES.setdefault(_row.family, _row.reading)

GENERIC = Adapter("generic", experts=r"(?:^|\.)(?P<layer>\d+)\.(?:[\w]+\.)*experts$", router="gate",
                  notes="fallback: any '...experts' module whose forward takes (hidden, top_k_index, top_k_weights)")


# Module-name segments that wrappers insert between a model's own names (torch.compile's OptimizedModule,
# TransformerLens bridge components, activation checkpointing, FSDP): dropped before the experts pattern is
# matched, so ``layers.0._original_component.mlp._original_component.experts`` reads as ``layers.0.mlp.experts``.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "original_component", "_original_component",
                              "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

# Attributes under which known wrappers keep the model they wrap (TransformerLens bridge, torch.compile, PEFT,
# DDP/FSDP, nnsight); any other attribute holding a transformers model is found too.
WRAPPED_MODEL_ATTRS = ("original_model", "_orig_mod", "base_model", "model", "module", "_model", "_module")


def _plain_name(name: str) -> str:
    """``name`` without wrapper segments (see ``WRAPPER_SEGMENTS``)."""
    parts = name.split(".")
    if not WRAPPER_SEGMENTS.intersection(parts):
        return name
    return ".".join(p for p in parts if p not in WRAPPER_SEGMENTS)


def _is_transformers_model(obj: object) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(obj, PreTrainedModel)


def unwrap_model(model: object, *, max_depth: int = 4) -> object:
    """The transformers model that ``model`` is or wraps (TransformerLens bridge, torch.compile, PEFT, DDP, ...).

    Known wrapper attributes are tried first, then every attribute and submodule, breadth first, up to
    ``max_depth`` levels. Returns ``model`` itself when it is a transformers model or wraps none.
    """
    if _is_transformers_model(model):
        return model
    seen = {id(model)}
    level: list[object] = [model]
    for _ in range(max_depth):
        nxt: list[object] = []
        for obj in level:
            attrs = getattr(obj, "__dict__", {})
            children = [attrs.get(a) for a in WRAPPED_MODEL_ATTRS]
            children += list(attrs.values()) + list((attrs.get("_modules") or {}).values())
            for child in children:
                if not isinstance(child, nn.Module) or id(child) in seen:
                    continue
                if _is_transformers_model(child):
                    return child
                seen.add(id(child))
                nxt.append(child)
        level = nxt
    return model


def wrapper_error(model: object, exc: Exception) -> WrappedModelError:
    """The error for an object that is not a transformers model and wraps none that capture can find."""
    return WrappedModelError(
        f"{exc} capture was given a {type(model).__module__}.{type(model).__name__}, which is not a transformers "
        "PreTrainedModel and holds none as an attribute; if it wraps a model (a TransformerLens bridge, an "
        "interpretability or serving wrapper), pass the transformers model itself (e.g. bridge.original_model)."
    )


def supported_families() -> list[str]:
    return sorted({row.family for row in ADAPTERS_LIST})


@dataclass
class MoELayer:
    """One MoE layer found in a model."""

    layer: int
    name: str
    module: nn.Module
    router: nn.Module | None
    num_experts: int


def _model_types(model: nn.Module) -> list[str]:
    cfg = getattr(model, "config", None)
    out = []
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "get_text_config", lambda: None)()):
        mt = getattr(c, "model_type", None)
        if mt and mt not in out:
            out.append(mt)
    return out


def _takes_routing_args(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _num_experts(module: nn.Module, config: Any, attrs: tuple[str, ...]) -> int:
    if attrs:
        total = sum(int(getattr(config, a, 0) or 0) for a in attrs)
        if total:
            return total
    for a in NUM_EXPERTS_ATTRS:
        v = getattr(module, a, None)
        if isinstance(v, int) and v > 0:
            return v
    for a in NUM_EXPERTS_ATTRS:
        v = getattr(config, a, None)
        if isinstance(v, int) and v > 0:
            return v
        if isinstance(v, (list, tuple)) and v:
            return int(max(v))
    raise UnsupportedModelError(f"cannot tell how many experts {type(module).__name__} has.")


def resolve_adapter(model: nn.Module, adapter: Adapter | str | None = None) -> Adapter:
    """The table row for ``model`` (by ``config.model_type``), or the generic fallback."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, str):
        if adapter not in ADAPTERS:
            raise UnsupportedModelError(f"unknown adapter {adapter!r}; known: {', '.join(supported_families())}.")
        return ADAPTERS[adapter]
    for mt in _model_types(model):
        if mt in ADAPTERS:
            return ADAPTERS[mt]
    return GENERIC


def find_moe_layers(model: nn.Module, adapter: Adapter) -> list[MoELayer]:
    """The MoE layers of ``model`` in layer order; a clear error for a dense model or an unknown layout."""
    pattern = re.compile(adapter.experts)
    config: Any = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: dict[int, MoELayer] = {}
    for name, module in model.named_modules():
        m = pattern.search(_plain_name(name))
        if not m:
            continue
        reading = adapter.reading
        if reading.hook == "pre" and not _takes_routing_args(module):
            continue
        layer = int(m.group("layer"))
        if layer in found and name.startswith(found[layer].name + "."):
            del found[layer]  # a wrapper and the module it wraps both matched: keep the wrapped module
        if layer in found:
            raise UnsupportedModelError(
                f"two MoE modules claim decoder layer {layer} ({found[layer].name}, {name}); "
                f"the {adapter.family} adapter's pattern is ambiguous for this model."
            )
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = model.get_submodule(parent_name) if parent_name else model
        if reading.module == "router":  # the hooked module is the router itself
            router: nn.Module | None = module
        else:
            router = getattr(parent, adapter.router, None) if adapter.router else None
        num = _num_experts(parent if reading.count_on == "parent" else module, text_config,
                           adapter.num_experts_attrs)
        found[layer] = MoELayer(layer=layer, name=name, module=module, router=router, num_experts=num)
    if not found:
        types = ", ".join(_model_types(model)) or type(model).__name__
        has_experts = any(_plain_name(n).endswith("experts") for n, _ in model.named_modules())
        what = "an MoE layout this version does not know" if has_experts else "a dense model (no MoE layers)"
        raise UnsupportedModelError(
            f"model_type {types!r} looks like {what}: no experts modules matched the "
            f"{adapter.family!r} adapter. Supported families: {', '.join(supported_families())}. "
            "For a new layout, pass capture(model, adapter=Adapter(...)) with the experts module pattern."
        )
    return [found[k] for k in sorted(found)]
