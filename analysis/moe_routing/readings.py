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

``RULES`` maps ``config.model_type`` to a ``Reading`` (rule name + how to read the router's parameters and its
output tuple). Families absent from it are refused by ``intervene`` for the modes that re-select.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Reading:
    """How one family's router is replayed: the rule, its parameters, and where its outputs sit.

    The router module returns a tuple; ``logits_at`` / ``weights_at`` / ``ids_at`` are the positions of the raw
    logits ``[T, E]``, the weights ``[T, k]`` and the expert ids ``[T, k]`` that the experts module receives.
    ``offset_on`` documents which score a ``bias`` delta is added to.
    """

    rule: str
    params: Callable[[nn.Module], dict[str, Any]]
    logits_at: int = 0
    weights_at: int = 1
    ids_at: int = 2
    unsorted: bool = False  # top-k(sorted=False): slot order is not score order
    offset_on: str = "router logit"
    notes: str = ""

    @property
    def function(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        return RULE_FUNCTIONS[self.rule]


def _softmax_params(router: nn.Module) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "norm": bool(router.norm_topk_prob), "cast_back": True}


def _mixtral_params(router: nn.Module) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "norm": True, "cast_back": False}


def _topk_softmax_params(router: nn.Module) -> dict[str, Any]:
    return {"top_k": int(router.top_k)}


def _group_params(router: nn.Module) -> dict[str, Any]:
    return {"top_k": int(router.top_k), "n_group": int(router.num_group), "topk_group": int(router.topk_group),
            "norm": bool(router.norm_topk_prob), "scale": router.routed_scaling_factor,
            "bias": router.e_score_correction_bias}


_SOFTMAX = Reading("softmax_topk", _softmax_params, notes="softmax(fp32) -> top-k -> renorm if norm_topk_prob")

RULES: dict[str, Reading] = {
    "qwen3_moe": _SOFTMAX,
    "qwen2_moe": _SOFTMAX,
    "olmoe": _SOFTMAX,
    "flex_olmo": _SOFTMAX,
    "mixtral": Reading("softmax_topk", _mixtral_params, notes="softmax(fp32) -> top-k -> renorm; weights fp32"),
    "minimax": Reading("softmax_topk", _mixtral_params, notes="mixtral's router"),
    "gpt_oss": Reading("topk_softmax", _topk_softmax_params, notes="linear+bias -> top-k on logits -> softmax of k"),
    "deepseek_v3": Reading("sigmoid_bias_group", _group_params, unsorted=True, offset_on="biased sigmoid score",
                           notes="sigmoid + e_score_correction_bias + group-limited top-k(sorted=False)"),
    "glm4_moe": Reading("sigmoid_bias_group", _group_params, unsorted=True, offset_on="biased sigmoid score",
                        notes="deepseek_v3's router"),
}


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
