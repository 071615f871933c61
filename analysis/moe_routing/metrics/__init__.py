"""moe_routing.metrics: pure functions from routing traces to tidy frames.

Every function takes a ``RoutingTrace``, a trace directory (streamed shard by shard, decoding only the columns
the metric reads), the ``TraceReader`` that ``capture_corpus`` / ``open_trace`` return (its options, e.g.
``skip_corrupt=True``, apply) or a list of ``RoutingTrace`` chunks, and returns a ``pandas.DataFrame`` (or an
``xarray`` object / array where named dimensions serve better; a label dimension is named after the label).
``layer`` columns hold decoder-layer indices (``trace.layers``). Headline numbers carry a baseline column
(uniform / random routing / shuffled labels) and, where sampling matters, a bootstrap CI over documents.

Families: load (``load``), specialization (``specialization``), co-activation (``coactivation``), cross-layer
and sequence (``sequence``), per-language (``language``), contrast of two conditions (``contrast``), causal
checks by ablating experts and steering sets (``causal``). Shared plumbing, one concern per module:
``_source`` (sources, chunks, labels), ``_ranking`` (first / second choice, top-k: one rule), ``_counts``
(count primitives), ``_stats`` (entropy, MI, JS, softmax, shuffled floors), ``_bootstrap`` (hashing, Poisson
bootstrap, intervals); ``_common`` re-exports them for old imports.
"""

from ._source import read_all
from .causal import (
    AblationMatrix,
    CausalClaim,
    ablation_effect,
    ablation_matrix,
    check_claim,
    expert_importance,
    steering_bias,
    steering_set,
)
from .contrast import contrast, contrast_summary, contrast_traces
from .language import language_divergence, language_experts, reference_divergence, top_expert_overlap
from .load import (
    balance_stats,
    capacity_drop,
    expert_load,
    expert_placement,
    greedy_placement,
    load_balance,
    load_balancing_loss,
    load_balancing_loss_by_layer,
    load_by_position,
    usage_counts,
)
from .sequence import consecutive_same_expert, path_entropy, router_agreement, transition_summary, transitions
from .specialization import (
    TOKEN_TYPES,
    VOCABULARY_PRESETS,
    coactivation,
    coactivation_matrices,
    coactivation_random,
    coactivation_summary,
    domain_specialization,
    label_nmi,
    label_probe,
    label_usage,
    token_type,
    token_type_label,
    token_type_specialization,
    top_tokens,
    vocabulary_specialization,
)
from .stability import routing_stability, stability_summary

__all__ = [
    "TOKEN_TYPES",
    "VOCABULARY_PRESETS",
    "AblationMatrix",
    "CausalClaim",
    "ablation_effect",
    "ablation_matrix",
    "balance_stats",
    "capacity_drop",
    "check_claim",
    "coactivation",
    "coactivation_matrices",
    "coactivation_random",
    "coactivation_summary",
    "consecutive_same_expert",
    "contrast",
    "contrast_summary",
    "contrast_traces",
    "domain_specialization",
    "expert_importance",
    "expert_load",
    "expert_placement",
    "greedy_placement",
    "label_nmi",
    "label_probe",
    "label_usage",
    "language_divergence",
    "language_experts",
    "load_balance",
    "load_balancing_loss",
    "load_balancing_loss_by_layer",
    "load_by_position",
    "path_entropy",
    "read_all",
    "reference_divergence",
    "router_agreement",
    "steering_bias",
    "steering_set",
    "token_type",
    "token_type_label",
    "token_type_specialization",
    "top_expert_overlap",
    "top_tokens",
    "transition_summary",
    "transitions",
    "usage_counts",
    "vocabulary_specialization",
]

# controls and uncertainty for the notebooks' claims (issue 10)
from .language import conditional_label_mi, language_usage

__all__ += ["conditional_label_mi", "language_usage"]
__all__ += ["routing_stability", "stability_summary"]
