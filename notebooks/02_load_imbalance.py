# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.16.0
# ---

# %% [markdown]
# # Load imbalance: how evenly do the experts share the work?
#
# An MoE layer is only as fast as its busiest expert: if a few experts receive most tokens, they (and the
# devices holding them) become the bottleneck, and with a fixed expert capacity the overflow is dropped.
# This notebook measures the load of every expert per layer, summarises each layer's balance (coefficient
# of variation, max over mean, normalised entropy, Gini) against a uniform router and against the sampling
# noise of random routing, checks whether load depends on the position in the sequence, simulates token
# dropping at a range of capacity factors, and asks how much a better placement of experts on devices would
# help. The demo compares its trained model with the same model at its initial weights (untrained); with a
# real `MODEL` the same cells run on that model alone.

# %% tags=["parameters"]
MODEL = "demo"  # "demo" or a Hugging Face id / local path
RUNS = "../runs"  # relative to notebooks/ (the repository's runs/, shared with make demo); trace directories (captured on first use)
PART = "heldout"  # corpus part: heldout / train (demo corpus), udhr (prose), flores (FLORES-200, real models)
LONG_PART = "udhr"  # a part with long sequences (UDHR paragraphs) for the position and capacity views
LAYER = None  # decoder layer for the per-layer views (None: the last MoE layer)
POSITION_BINS = [0, 1, 2, 4, 8, 16, 32, 64, 128]  # position buckets (the last is open-ended)
CAPACITY_FACTORS = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
DEVICES = [2, 4, 8]  # expert-parallel group sizes for the placement what-if

# %%
import pandas as pd
import plotly.express as px

import moe_routing as mr
import moe_routing.plots as mp
from moe_routing.demo_pipeline import demo_runs, model_variants

mp.use_theme()
paths = demo_runs(MODEL, RUNS, parts=(PART, LONG_PART), progress=False)  # captures what is missing
variants = list(model_variants(MODEL))  # demo: ["trained", "untrained"]; real model: ["model"]
traces = {v: mr.RoutingTrace.load(paths[f"{v}/{PART}"]) for v in variants}
long = {v: mr.RoutingTrace.load(paths[f"{v}/{LONG_PART}"]) for v in variants}
name = variants[0]
main = traces[name]
layer = main.layers[-1] if LAYER is None else LAYER
for v in variants:
    print(f"{v:>9} · {PART}: {traces[v]!r}")
    print(f"{v:>9} · {LONG_PART}: {long[v].num_tokens} tokens in {len(set(long[v].doc_ids.tolist()))} sequences")

# %% [markdown]
# ## Expert load per layer
#
# Each cell is an expert's load relative to its fair share (1 = exactly 1/E of the layer's routed slots;
# white: fair share, red: overloaded, blue: underused; both models on one colour scale).

# %%
loads = {v: mr.metrics.expert_load(t) for v, t in traces.items()}
top = max(float(f["load_ratio"].max()) for f in loads.values())  # one colour scale for both models
mp.expert_load_heatmap(loads[name], relative=True, zmax=top,
                       title=f"Expert load relative to a uniform router · {name} · {PART}")

# %%
if "untrained" in loads:
    fig = mp.expert_load_heatmap(loads["untrained"], relative=True, zmax=top,
                                 title=f"Expert load relative to a uniform router · untrained · {PART} (same scale)")
    fig.show()

# %% [markdown]
# The trained demo model is clearly unbalanced: in every layer a few experts take two to four times their
# fair share while others are nearly idle, even though it was trained with the usual load-balancing loss
# (coefficient 0.01). Its untrained twin spreads the same tokens much more evenly: a random router projects
# token embeddings onto random directions, which no language or token type prefers. Training bought
# specialisation (notebook 03) with balance.

# %%
mp.load_distribution(loads[name], title=f"Distribution of expert load per layer · {name} · {PART}")

# %% [markdown]
# Each dot is one expert. The spread is wide in every layer, with a long upper tail of a few overloaded
# experts; the busiest expert of a layer sets the pace of the whole layer.

# %% [markdown]
# ## Balance statistics by layer
#
# Over each layer's expert counts: coefficient of variation (std / mean, 0 = balanced), max over mean (the
# busiest expert relative to the average), normalised entropy (1 = uniform) and the Gini coefficient
# (0 = equal). The dashed line in the CV panel is what uniformly random routing of the same number of tokens
# would give: a measured CV near it is sampling noise, not imbalance.

# %%
balance = pd.concat([mr.metrics.load_balance(t).assign(model=v) for v, t in traces.items()], ignore_index=True)
mp.load_balance_lines(balance, color="model" if len(traces) > 1 else None)

# %%
balance[["model", "layer", "decisions", "cv", "cv_random", "max_over_mean", "entropy_norm", "gini", "dead"]].round(3)

# %% [markdown]
# All four statistics agree: the trained model is far from balanced in every layer (CV around 1, the
# busiest expert at 2.5-4x the mean, Gini around 0.4-0.55), the untrained one much closer (CV 0.1-0.3).
# Both sit far above the random-routing CV, so none of it is sampling noise of a finite corpus.

# %% [markdown]
# ## Load by position in the sequence
#
# Does the expert choice depend on where a token sits in its sequence? On the long UDHR paragraphs: rows are
# position buckets (powers of two), columns experts, colour the share of the bucket's first choices.

# %%
mp.expert_by_position(long[name], layer, bins=POSITION_BINS,
                      title=f"First-choice expert by position · decoder layer {layer} · {name} · {LONG_PART}")

# %% [markdown]
# The first token of a sequence is routed differently from the rest (it attends to nothing but itself);
# after a few positions the mix settles and stays roughly the same along the sequence. Position is not what
# makes the load uneven: the same experts dominate every bucket. (The last bucket holds only the few
# longest paragraphs.)

# %% [markdown]
# ## Token dropping at a fixed expert capacity
#
# Training and serving stacks that give each expert a fixed capacity per group of tokens (Switch Transformer,
# GShard) drop the slots that arrive once it is full: capacity = capacity factor x fair share. The simulation
# treats every sequence as one group, serves all first choices in token order before the second choices, and
# compares with uniformly random routing (dashed: imbalance that comes from sampling alone). It runs on the
# long UDHR paragraphs: with the demo's short UI strings an expert's capacity would be a slot or two.

# %%
drops = {v: mr.metrics.capacity_drop(t, CAPACITY_FACTORS, by_position=True, bins=POSITION_BINS)
         for v, t in long.items()}
mp.capacity_drop_curves(drops[name], title=f"Routed slots dropped at a given expert capacity · {name} · {LONG_PART}")

# %%
summary = pd.concat([mr.metrics.capacity_drop(t, CAPACITY_FACTORS).assign(model=v) for v, t in long.items()])
summary.groupby(["model", "capacity_factor"])[["drop_rate", "drop_rate_random"]].mean().unstack(0).round(3)

# %% [markdown]
# At capacity factor 1 the trained model would drop most of its routed slots, several times what a balanced
# random router loses to chance alone, and even a factor of 2 leaves it dropping about half. The more balanced
# untrained model drops clearly less, but also far more than random routing: a per-sequence group is small,
# and a router that is deterministic in the token sends every repeat of a frequent token to the same queue.

# %% [markdown]
# Because the queue is served in token order, the tokens that lose their slot are the late ones. At capacity
# factor 1, per position bucket:

# %%
at1 = pd.concat([d[d["capacity_factor"] == 1.0].assign(model=v) for v, d in drops.items()], ignore_index=True)
at1 = at1.groupby(["model", "pos_start", "pos_end"], as_index=False)[["drop_rate", "drop_rate_random"]].mean()
at1["positions"] = [f"{a}+" if b < 0 else (f"{a}" if b - a == 1 else f"{a}–{b - 1}")
                    for a, b in zip(at1["pos_start"], at1["pos_end"], strict=True)]
by_pos = pd.concat([at1.assign(router=at1["model"]),
                    at1.assign(router="random routing", drop_rate=at1["drop_rate_random"]).query(f"model == '{name}'")])
fig = px.line(by_pos, x="positions", y="drop_rate", color="router", markers=True,
              labels={"drop_rate": "routed slots dropped (mean over layers)", "positions": "position in sequence"},
              title=f"Drops by position at capacity factor 1 · {LONG_PART} (queues served in token order)")
fig.update_traces(selector={"name": "random routing"}, line_dash="dash", line_color="#888")
fig.update_layout(yaxis_tickformat=".0%", height=420)
fig

# %% [markdown]
# ## Expert placement what-if
#
# With expert parallelism each device holds E/G experts. The default contiguous sharding (experts 0..E/G-1 on
# device 0, ...) inherits whatever imbalance the router has; a greedy placement from the measured loads (the
# idea behind DeepSeek's EPLB) puts heavy and light experts together. Bars: the busiest device's load over the
# mean device load (1 = balanced).

# %%
placement = pd.concat([mr.metrics.expert_placement(main, g) for g in DEVICES], ignore_index=True)
mp.placement_bars(placement)

# %% [markdown]
# With the default contiguous sharding the busiest device of the trained model carries well above the mean
# load, more so with more devices (fewer experts per device average out less). Placing experts greedily by
# their measured load brings 2 and 4 devices back to within a few percent of balance; with 8 devices (two
# experts each) a single hot expert can no longer be paired away.

# %% [markdown]
# ## Check
#
# The key results, recomputed: (1) every layer's imbalance is real, well above the CV that random routing of
# the same number of tokens gives; (2) drops concentrate at the end of sequences, and the router drops more
# than random routing would; (3) on the demo, the trained model is less balanced than its untrained twin.

# %%
bal = balance[balance["model"] == name]
assert (bal["cv"] > 3 * bal["cv_random"]).all(), f"some layer's load is as even as random routing:\n{bal}"
d1 = at1[at1["model"] == name].sort_values("pos_start")
assert d1["drop_rate"].iloc[-1] > d1["drop_rate"].iloc[0], "drops should grow towards the end of the sequences"
assert (summary.query(f"model == '{name}' and capacity_factor == 1.0")["drop_rate"]
        > summary.query(f"model == '{name}' and capacity_factor == 1.0")["drop_rate_random"]).all()
if "untrained" in traces:
    cv = balance.groupby("model")["cv"].mean()
    assert cv["trained"] > cv["untrained"], f"expected training to cost balance, got mean CV {cv.to_dict()}"
    print(f"mean CV: trained {cv['trained']:.2f} vs untrained {cv['untrained']:.2f} (random routing "
          f"{bal['cv_random'].mean():.3f}); drops at capacity 1: first positions {d1['drop_rate'].iloc[0]:.1%}, "
          f"last {d1['drop_rate'].iloc[-1]:.1%}")
