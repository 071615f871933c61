"""Selection rules as data: each MoE family's router replayed as a pure function of its scores.

``mr.intervene`` re-selects experts (ban, force, steer) by replaying the family's own selection rule on edited
scores. A rule is a pure function ``rule(logits[T, E], params, edit) -> (ids[T, k], weights[T, k])`` that runs
the same torch operations, in the same order and dtypes, as the transformers 5.24 router; with no edit it must be
bit-identical (``torch.equal``) to what the router returned. ``intervene`` checks that on the first call of each
layer and refuses the block when it does not hold; the tests prove it per family.

Edits (``Edit``) act on the *selection score* only -- the quantity the family's top-k ranks -- and never on the
weights, which always follow the family's own normalisation of the unmodified scores (the way DeepSeek-V3's own
``e_score_correction_bias`` works):

- ``ban``   the expert's selection score is ``-inf`` before any top-k (and before group scores, for group-limited
            routers), so the token gets its next choice;
- ``force`` the expert's selection score is ``+inf``: it joins every token's top-k, the lowest-ranked slot drops;
- ``offset`` a steering delta per expert, added to the *router logit* for softmax / linear routers
            (``softmax_topk`` ranks ``p_e * exp(delta)``, i.e. ``softmax(logit + delta)`` before renormalising;
            ``topk_softmax`` ranks ``logit + delta``) and to the *biased sigmoid score* for
            ``sigmoid_bias_group`` (where the family's correction bias lives). Experts with delta 0 keep their
            score bit for bit, so ``bias=0`` changes nothing and a huge delta equals ``force``.

A ``Reading`` is one value of the adapter table (``adapters.Adapter.reading``): how capture hooks the family
(hook kind, which module, the read function; ``READINGS`` by name) and, when it has one, the selection rule that
interventions replay. ``RULES`` maps a family to its Reading when that has a rule (filled from the adapter table);
families absent from it are refused by ``intervene`` for the modes that re-select.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from .errors import CaptureError
from .trace import NO_EXPERT


@dataclass(frozen=True)
class Edit:
    """What to change in the selection scores of one layer (all ``[E]`` tensors on the router's device)."""

    ban: torch.Tensor | None = None  # bool [E]
    force: torch.Tensor | None = None  # bool [E]
    offset: torch.Tensor | None = None  # float32 [E]


NO_EDIT = Edit()


def _apply_masks(choice: torch.Tensor, edit: Edit) -> torch.Tensor:
    if edit.ban is not None:
        choice = choice.masked_fill(edit.ban, float("-inf"))
    if edit.force is not None:
        choice = choice.masked_fill(edit.force, float("inf"))
    return choice


# ---------------------------------------------------------------------------------------------- the rules
def softmax_topk(logits: torch.Tensor, params: dict[str, Any], edit: Edit = NO_EDIT) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """softmax (fp32) over all experts -> top-k of the probabilities -> renormalise if ``norm`` -> cast back.

    qwen3_moe, qwen2_moe, olmoe, mixtral (weights stay fp32: ``cast_back=False``), ...
    params: ``top_k``, ``norm`` (bool), ``cast_back`` (cast weights to the logits' dtype).
    """
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    choice = probs
    if edit.offset is not None:  # a logit offset: p_e * exp(delta) on the biased columns only, exact elsewhere
        logp = torch.nn.functional.log_softmax(logits, dtype=torch.float, dim=-1)
        choice = torch.where(edit.offset != 0, torch.exp(logp + edit.offset), probs)
    choice = _apply_masks(choice, edit)
    if choice is probs:
        weights, ids = torch.topk(probs, params["top_k"], dim=-1)
    else:
        ids = torch.topk(choice, params["top_k"], dim=-1).indices
        weights = probs.gather(-1, ids)
    if params["norm"]:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if params.get("cast_back", True):
        weights = weights.to(logits.dtype)
    return ids, weights


def topk_softmax(logits: torch.Tensor, params: dict[str, Any], edit: Edit = NO_EDIT) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """top-k of the logits -> softmax over the k chosen logits (gpt_oss, granitemoe). params: ``top_k``."""
    choice = logits if edit.offset is None else logits.float() + edit.offset
    choice = _apply_masks(choice, edit)
    if choice is logits:
        values, ids = torch.topk(logits, params["top_k"], dim=-1)
    else:
        ids = torch.topk(choice, params["top_k"], dim=-1).indices
        values = logits.gather(-1, ids)
    weights = torch.nn.functional.softmax(values, dim=1, dtype=values.dtype)
    return ids, weights


def sigmoid_bias_group(logits: torch.Tensor, params: dict[str, Any], edit: Edit = NO_EDIT) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """DeepSeek-V3 style: sigmoid -> + correction bias (selection only) -> group scores (top-2 sums) -> keep
    ``topk_group`` groups -> top-k (sorted=False) -> unbiased weights -> renormalise (+1e-20) -> x scaling.

    deepseek_v3, glm4_moe, dots1, ... params: ``top_k``, ``n_group``, ``topk_group``, ``norm``, ``scale``,
    ``bias`` (the router's ``e_score_correction_bias`` [E]). A ban drops the expert from group scores and top-k.
    """
    n_group, num = params["n_group"], logits.shape[-1]
    scores = logits.sigmoid()
    choice = scores + params["bias"]
    if edit.offset is not None:
        choice = choice + edit.offset
    choice = _apply_masks(choice, edit)
    group_scores = choice.view(-1, n_group, num // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=params["topk_group"], dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num // n_group).reshape(-1, num)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=params["top_k"], dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if params["norm"]:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * params["scale"]
    return ids, weights


RULE_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "softmax_topk": softmax_topk,
    "topk_softmax": topk_softmax,
    "sigmoid_bias_group": sigmoid_bias_group,
}


# ---------------------------------------------------------------------------------------------- capture readers
# A "pre" reader runs in a forward pre-hook on the matched module: read(args, kwargs, sig) -> (index [T, k],
# weights [T, k]). A "post" reader runs in a forward hook: read(module, output, k) -> (index [T, k], weights [T, k],
# router logits [T, E] or None). All return tensors on the model's device.
def read_experts_args(args: tuple, kwargs: dict, sig: inspect.Signature) -> tuple[torch.Tensor, torch.Tensor]:
    """experts(hidden [T, H], index [T, k], weights [T, k]): exactly what the experts are run with."""
    if len(args) >= 3:  # the common call experts(hidden, index, weights): no signature binding needed
        return args[1], args[2]
    bound = sig.bind_partial(*args, **kwargs).arguments
    values = list(bound.values())
    if len(values) < 3:
        raise CaptureError(
            f"the experts module was called with {len(values)} arguments; expected (hidden, index, weights)."
        )
    return values[1], values[2]


def read_onehot_capacity(args: tuple, kwargs: dict, sig: inspect.Signature) -> tuple[torch.Tensor, torch.Tensor]:
    """switch_transformers: a capacity-masked one-hot [T, 1, E]; an all-zero row (dropped token) is expert -1."""
    onehot, weights = read_experts_args(args, kwargs, sig)
    onehot = onehot.reshape(onehot.shape[0], -1)  # [T, E]
    routed = onehot.sum(dim=-1) > 0
    index = torch.where(routed, onehot.argmax(dim=-1), torch.full_like(routed, NO_EXPERT, dtype=torch.long))
    w = torch.where(routed, weights.reshape(-1).to(torch.float32), torch.zeros((), dtype=torch.float32,
                                                                               device=weights.device))
    return index[:, None], w[:, None]


def read_skip_zero_weight(args: tuple, kwargs: dict, sig: inspect.Signature) -> tuple[torch.Tensor, torch.Tensor]:
    """zaya: a skip slot arrives as index 0 with weight 0 and is recorded as -1."""
    index, weights = read_experts_args(args, kwargs, sig)
    index = torch.where(weights == 0, torch.full_like(index, NO_EXPERT), index)
    return index, weights


def read_router_scores(module: nn.Module, output: Any, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama4: dense scores [T, E] (0 outside the top-k) scale the experts' input; ids are top-k of the logits."""
    scores, logits = output[0], output[1]
    index = torch.topk(logits, k, dim=-1).indices
    return index, scores.gather(-1, index), logits


def read_jetmoe_sorted(module: Any, output: Any, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """jetmoe: the router hands the experts an expert-sorted dispatch; scatter it back to [T, k] slots.

    Output: (index_sorted_experts [T*k] -- flat position t*k+slot of each sorted entry, batch_index, batch_gates
    [T*k], expert_size (list, entries per expert), logits [T, E]).
    """
    index_sorted, _, gates, expert_size, logits = output
    k = int(module.top_k)
    sizes = torch.as_tensor(expert_size, device=index_sorted.device)
    experts = torch.repeat_interleave(torch.arange(len(expert_size), device=index_sorted.device), sizes)
    flat_index = torch.empty_like(index_sorted)
    flat_index[index_sorted] = experts
    flat_weights = torch.empty_like(gates)
    flat_weights[index_sorted] = gates
    return flat_index.view(-1, k), flat_weights.view(-1, k), logits


def read_doge_product_keys(module: Any, output: Any, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """doge: replay DogeCDMoE's product-key top-k on its own router logits ([2, T, num_keys], output 1)."""
    router_logits = output[1]
    n = router_logits.shape[1]
    keys = int(module.num_keys)
    (scores_x, scores_y), (indices_x, indices_y) = router_logits.topk(keys, dim=-1)
    all_scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).view(n, -1)
    all_indices = (indices_x.unsqueeze(-1) * keys + indices_y.unsqueeze(-2)).view(n, -1)
    scores, position = all_scores.topk(int(module.top_k), dim=-1)
    index = all_indices.gather(-1, position)
    weights = torch.nn.functional.softmax(scores, dim=-1)
    if module.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    per_expert = (router_logits[0].unsqueeze(-1) + router_logits[1].unsqueeze(-2)).view(n, -1)  # [T, keys^2]
    return index, weights, per_expert


def _no_params(router: Any) -> dict[str, Any]:
    raise TypeError("this reading has no selection rule (Reading.rule is empty); interventions cannot replay it.")


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True, eq=False, repr=False)
class Reading:
    """How one family's routing is read by capture and replayed by interventions (one value of the table).

    Selection rule (``intervene``; empty ``rule``: none): ``rule`` names a function of ``RULE_FUNCTIONS``,
    ``params(router)`` its parameters. The router module returns a tuple; ``logits_at`` / ``weights_at`` /
    ``ids_at`` are the positions of the raw logits ``[T, E]``, the weights ``[T, k]`` and the expert ids
    ``[T, k]`` that the experts module receives. ``offset_on`` documents which score a ``bias`` delta is added to.

    Capture: ``name`` (the reading's name in ``READINGS``), ``hook`` (``"pre"``: a forward pre-hook whose
    ``read(args, kwargs, sig)`` returns ``(index [T,k], weights [T,k])``; ``"post"``: a forward hook whose
    ``read(module, output, k)`` returns ``(index, weights, logits [T,E] | None)``), ``module`` (what the adapter's
    pattern matches: ``"experts"``, ``"router"`` -- the router is the hooked module -- or ``"block"``) and
    ``count_on`` (``"module"`` or ``"parent"``: where the number of experts is read). A ``"pre"`` reading only
    matches modules whose forward takes ``(hidden, index, weights)``.

    Compared with a string, a Reading compares its ``name`` (readings were named by strings before; deprecated).
    """

    rule: str = ""
    params: Callable[[Any], dict[str, Any]] = _no_params
    logits_at: int = 0
    weights_at: int = 1
    ids_at: int = 2
    unsorted: bool = False  # top-k(sorted=False): slot order is not score order
    offset_on: str = "router logit"
    notes: str = ""
    name: str = "experts_args"
    hook: Literal["pre", "post"] = "pre"
    module: Literal["experts", "router", "block"] = "experts"
    read: Callable[..., tuple[torch.Tensor, ...]] = read_experts_args
    count_on: Literal["module", "parent"] = "module"

    @property
    def function(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The selection rule's function (``RULE_FUNCTIONS[rule]``)."""
        if not self.rule:
            raise KeyError(f"the {self.name!r} reading has no selection rule.")
        return RULE_FUNCTIONS[self.rule]

    def _key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):  # deprecated: readings were strings
            return self.name == other
        return isinstance(other, Reading) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.name, self.rule, self.hook, self.module))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        rule = f", rule={self.rule!r}" if self.rule else ""
        return f"Reading({self.name!r}, hook={self.hook!r}, module={self.module!r}{rule})"


EXPERTS_ARGS = Reading(notes="forward pre-hook on the experts module: (hidden[T,H], index[T,k], weights[T,k])")
ONEHOT_CAPACITY = Reading(name="onehot_capacity", read=read_onehot_capacity,
                          notes="capacity-masked one-hot [T,1,E]; an all-zero row is a dropped token (-1)")
SKIP_ZERO_WEIGHT = Reading(name="skip_zero_weight", read=read_skip_zero_weight,
                           notes="a skip slot (index 0, weight 0) is recorded as -1")
ROUTER_SCORES = Reading(name="router_scores", hook="post", module="router", read=read_router_scores,
                        count_on="parent", notes="dense scores [T,E] from the router; ids: top-k of its logits")
JETMOE_SORTED = Reading(name="jetmoe_sorted", hook="post", module="router", read=read_jetmoe_sorted,
                        notes="expert-sorted dispatch from the router, scattered back to [T,k]")
DOGE_PRODUCT_KEYS = Reading(name="doge_product_keys", hook="post", module="block", read=read_doge_product_keys,
                            notes="product-key top-k replayed from the block's router logits")

READINGS: dict[str, Reading] = {r.name: r for r in (EXPERTS_ARGS, ONEHOT_CAPACITY, SKIP_ZERO_WEIGHT, ROUTER_SCORES,
                                                    JETMOE_SORTED, DOGE_PRODUCT_KEYS)}


def _softmax_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "norm": bool(router.norm_topk_prob), "cast_back": True}


def _mixtral_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "norm": True, "cast_back": False}


def _topk_softmax_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k)}


def _group_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "n_group": int(router.num_group), "topk_group": int(router.topk_group),
            "norm": bool(router.norm_topk_prob), "scale": router.routed_scaling_factor,
            "bias": router.e_score_correction_bias}


# experts_args readings with a replayable selection rule (the adapter rows of those families hold them)
SOFTMAX_TOPK = Reading("softmax_topk", _softmax_params, notes="softmax(fp32) -> top-k -> renorm if norm_topk_prob")
MIXTRAL_SOFTMAX = Reading("softmax_topk", _mixtral_params, notes="softmax(fp32) -> top-k -> renorm; weights fp32")
TOPK_SOFTMAX = Reading("topk_softmax", _topk_softmax_params, notes="linear+bias -> top-k on logits -> softmax of k")
SIGMOID_GROUP = Reading("sigmoid_bias_group", _group_params, unsorted=True, offset_on="biased sigmoid score",
                        notes="sigmoid + e_score_correction_bias + group-limited top-k(sorted=False)")
_SOFTMAX = SOFTMAX_TOPK

# ``RULES`` maps a family (the adapter row's ``family``) to its Reading when that has a selection rule. It is filled
# from the adapter table when ``moe_routing.adapters`` is imported (always, through the package); an entry set here
# directly is kept (the table's row does not override it).
RULES: dict[str, Reading] = {}


def reading_for(model_types: list[str]) -> tuple[str, Reading] | None:
    """The first of ``model_types`` with a replayable rule, as (model_type, Reading)."""
    for mt in model_types:
        if mt in RULES:
            return mt, RULES[mt]
    return None


# ---------------------------------------------------------------------------------------------- more families
# Appended rules and table rows: each family's router forward in transformers 5.24 was read and is replayed op for
# op; ``tests/test_intervene.py`` proves every row bit-identical on a tiny real model (fp32 and bf16).
def topk_score(logits: torch.Tensor, params: dict[str, Any], edit: Edit = NO_EDIT) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """top-k of the logits -> softmax (``fn="softmax"``, in fp32 when ``upcast``) or sigmoid (``fn="sigmoid"``,
    renormalised when ``norm``) of the k chosen logits -> cast to ``out_dtype`` (when given).

    granitemoe* (fp32 logits, weights cast to the hidden dtype), aria (all in the logits' dtype), cohere2_moe.
    params: ``top_k``, ``fn``, ``upcast``, ``norm``, ``out_dtype``.
    """
    choice = logits if edit.offset is None else logits.float() + edit.offset
    choice = _apply_masks(choice, edit)
    if choice is logits:
        values, ids = torch.topk(logits, params["top_k"], dim=-1)
    else:
        ids = torch.topk(choice, params["top_k"], dim=-1).indices
        values = logits.gather(-1, ids)
    if params.get("fn", "softmax") == "sigmoid":
        weights = torch.nn.functional.sigmoid(values)
        if params.get("norm"):
            weights = weights / torch.sum(weights, dim=-1, keepdim=True)
    elif params.get("upcast"):
        weights = torch.nn.functional.softmax(values, dim=-1, dtype=torch.float)
    else:
        weights = torch.nn.functional.softmax(values, dim=-1)
    if params.get("out_dtype") is not None:
        weights = weights.to(params["out_dtype"])
    return ids, weights


def softmax_topk_to(logits: torch.Tensor, params: dict[str, Any], edit: Edit = NO_EDIT) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """``softmax_topk`` whose weights are cast to ``out_dtype`` (the hidden dtype) instead of the logits' dtype:
    routers that compute fp32 logits from an fp32 copy of the weights (lara_mini)."""
    ids, weights = softmax_topk(logits, {**params, "cast_back": False}, edit)
    return ids, weights.to(params["out_dtype"])


RULE_FUNCTIONS["topk_score"] = topk_score
RULE_FUNCTIONS["softmax_topk_to"] = softmax_topk_to


def _always_norm_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "norm": True, "cast_back": True}


def _no_norm_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "norm": False, "cast_back": True}


def _lara_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "norm": bool(router.norm_topk_prob), "out_dtype": router.weight.dtype}


def _granite_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "fn": "softmax", "upcast": False, "out_dtype": router.weight.dtype}


def _aria_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "fn": "softmax", "upcast": False}


def _cohere2_params(router: Any) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "fn": str(router.expert_selection_fn), "norm": bool(router.norm_topk_prob),
            "upcast": True, "out_dtype": router.weight.dtype}


_GROUP = Reading("sigmoid_bias_group", _group_params, unsorted=True, offset_on="biased sigmoid score",
                 notes="deepseek_v3's router, verbatim")
_GRANITE = Reading("topk_score", _granite_params, notes="fp32 logits -> top-k -> softmax of k -> hidden dtype")

RULES.update({
    # qwen3_moe's router, verbatim (softmax fp32 -> top-k -> renorm if norm_topk_prob)
    **dict.fromkeys(("qwen3_next", "qwen4_exp_text", "mellum"), _SOFTMAX),
    # the same, always renormalised
    "qwen3_5_moe_text": Reading("softmax_topk", _always_norm_params, notes="softmax(fp32) -> top-k -> renorm"),
    "jamba": Reading("softmax_topk", _no_norm_params, notes="softmax(fp32) -> top-k, no renorm"),
    "lara_mini": Reading("softmax_topk_to", _lara_params, notes="fp32 logits -> softmax -> top-k -> renorm"),
    **dict.fromkeys(("granitemoe", "granitemoeshared", "granitemoe_swa", "granitemoehybrid"), _GRANITE),
    "aria_text": Reading("topk_score", _aria_params, notes="top-k of logits -> softmax of k"),
    "cohere2_moe": Reading("topk_score", _cohere2_params, notes="top-k of logits -> softmax (fp32) or sigmoid"),
    **dict.fromkeys(("deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "dots1", "dots3_note_text", "kimi_linear",
                     "bailing_hybrid", "exaone_moe", "solar_open", "mimo_v2_flash", "axk1", "nemotron_h"), _GROUP),
})
