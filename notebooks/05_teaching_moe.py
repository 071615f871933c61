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
# # Teaching MoE: train a tiny Mixture-of-Experts and watch its router learn
#
# A class notebook. We build a real Qwen3-MoE model (the architecture of Qwen3-30B-A3B, shrunk to 2 layers
# of 8 experts and about half a million parameters), train it live on the CPU for a few hundred steps on the
# demo corpus (Django's interface strings in 24 languages), and save checkpoints along the way. Then we look
# inside: how the router's choices settle over training (router saturation, as in the OLMoE paper), how
# evenly the experts share the work, what happens without the load-balancing loss, and what changing the
# number of experts per token (top-k) does. The two comparisons are repeated over several seeds, so that a
# difference between two settings can be read against the spread between seeds. Each run takes seconds; the
# last cell prints how long the whole notebook took. The concepts (router, top-k, auxiliary loss, capacity)
# are explained on the way, with small diagrams.

# %% tags=["parameters"]
MODEL = "demo"  # whose tokenizer and corpus to use ("demo": 4096 tokens, keeps the runs fast)
RUNS = "../runs"  # relative to notebooks/ (the repository's runs/, shared with make demo); checkpoints are saved under RUNS/teaching/<run>/step-NNNN
DEVICE = None  # device_map of the pipeline run: None = "auto" with a GPU present, else the CPU
DTYPE = "auto"  # weights dtype of the pipeline run ("auto": the checkpoint's)
LANGS = None  # languages of the pipeline run (None: the corpus's default)
CORPUS_FALLBACK = None  # set by the pipeline: why FLORES+ was not used (None: it was, or not asked for)
STEPS = 100  # optimiser steps per run
SEED = 0  # the watched run's seed: same initial weights and batches for every setting
N_SEEDS = 3  # the comparisons (aux loss on/off, top-k) are repeated with seeds SEED, SEED+1, ...
CI = 0.95  # confidence level of the intervals over seeds (Student t)
SPEARMAN_MIN = 0.8  # check: saturation must rise with the checkpoint step at least this monotonically
LR = 5e-3  # peak learning rate (AdamW, 10 warm-up steps, cosine decay to 10%)
AUX_COEF = 0.01  # load-balancing loss coefficient of the main run (Switch Transformer's value)
TOP_KS = [1, 2, 4]  # experts per token compared in the last section
CHECKPOINTS = [0, 5, 10, 20, 30, 45, 60, 80]  # steps saved besides the final one
BATCH, SEQ_LEN = 12, 64  # sequences per step x tokens per sequence
EVAL_PER_LANG = 24  # held-out sentences per language to watch routing on

# %% [markdown]
# ## What is a Mixture-of-Experts layer?
#
# In a normal transformer every token goes through the same feed-forward network (MLP). An MoE layer has
# several MLPs, the *experts*, and a small *router* that decides, for each token separately, which of them
# to use:
#
# ```
#                        token vector x
#                              |
#                     +--------v--------+
#                     |      router     |   logits = W x  ->  softmax  ->  p(expert | x)
#                     +--------+--------+
#                              |   top-k: keep the k most probable experts (here k = 2 of 8)
#           +---------+--------+--------+---------- ... ---------+
#           v         v        v        v                        v
#       expert 0  expert 1  expert 2  expert 3      ...      expert 7
#        (runs)    (runs)    (idle)    (idle)                 (idle)
#           |         |
#           +----+----+
#                v
#      output = w0 * E0(x) + w1 * E1(x)      w0, w1 = the two chosen probabilities, renormalised to sum 1
# ```
#
# With 8 experts and top-2, the layer holds 8 MLPs' worth of parameters but spends the compute of 2 on each
# token: that is how Qwen3-30B-A3B has 30 B parameters but activates only 3 B per token. The router is just
# a linear layer, trained with everything else by gradient descent: it receives a gradient through the
# weights w it gives the chosen experts.

# %%
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import torch
import transformers
from IPython.display import Markdown, display
from plotly.subplots import make_subplots
from scipy import stats
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import moe_routing as mr
import moe_routing.plots as mp
from moe_routing import demo
from moe_routing.corpora import load_corpus
from moe_routing.models import resolve_model_path


def say(*parts: str) -> None:
    """A sentence computed from the data, shown as markdown."""
    display(Markdown(" ".join(parts)))


def mean_ci(values) -> pd.Series:
    """Mean of the per-seed values with its Student-t interval at level CI (no interval from one seed)."""
    x = np.asarray(values, dtype=float)
    half = stats.t.ppf((1 + CI) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return pd.Series({"mean": x.mean(), "low": x.mean() - half, "high": x.mean() + half, "seeds": len(x)})


def span(values, fmt: str = ".2f") -> str:
    """'a-b' over the values (or 'a' when both ends agree at this precision)."""
    values = pd.Series(values)
    lo, hi = f"{values.min():{fmt}}", f"{values.max():{fmt}}"
    return lo if lo == hi else f"{lo}-{hi}"


def fmt_ci(r: pd.Series, fmt: str = ".3f") -> str:
    return f"{r['mean']:{fmt}} [{r['low']:{fmt}}, {r['high']:{fmt}}]" if r["seeds"] > 1 else f"{r['mean']:{fmt}}"


mp.use_theme()
transformers.utils.logging.disable_progress_bar()  # no bar for each checkpoint saved or loaded
mr_runs = Path(RUNS)
torch.set_num_threads(1)  # one thread: the same numbers on every machine load (2 threads change the sums' order)
started, cpu_started = time.perf_counter(), time.process_time()
# the demo's tokenizer alone (cached, or its BPE trained in seconds): no demo model is trained for it
tokenizer = demo.demo_tokenizer() if MODEL == "demo" else AutoTokenizer.from_pretrained(resolve_model_path(MODEL))
eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

# training data: every training text followed by end-of-text, concatenated into one stream of token ids
train_texts = load_corpus("demo", split="train")["text"].tolist()
stream = np.array([t for ids in tokenizer(train_texts, add_special_tokens=False)["input_ids"]
                   for t in [*ids, eos]])
# watch set: held-out sentences (never trained on), the same ones at every checkpoint
held = load_corpus("demo", split="heldout").groupby("lang").head(EVAL_PER_LANG)
watch = [[*ids[:127], eos] for ids in tokenizer(held["text"].tolist(), add_special_tokens=False)["input_ids"]]
print(f"training stream: {len(stream):,} tokens; watch set: {len(watch)} sentences, "
      f"{sum(map(len, watch)):,} tokens in {held['lang'].nunique()} languages")

# %% [markdown]
# ## The model
#
# `AutoConfig.for_model("qwen3_moe", ...)` gives the real Qwen3-MoE architecture from `transformers`, at a
# size a laptop trains in seconds. Every layer is an MoE layer; `num_experts_per_tok` is k;
# `router_aux_loss_coef` weighs the load-balancing loss explained below.

# %%
TINY = dict(
    vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, moe_intermediate_size=64, num_experts=8, norm_topk_prob=True,
    max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=pad, eos_token_id=eos, bos_token_id=eos,
)


def make_model(k: int, aux_coef: float, seed: int = SEED, **overrides) -> torch.nn.Module:
    """A fresh tiny Qwen3-MoE with k experts per token (``overrides``: other config fields)."""
    config = AutoConfig.for_model("qwen3_moe", **{**TINY, **overrides}, num_experts_per_tok=k,
                                  router_aux_loss_coef=aux_coef,
                                  output_router_logits=True)  # the aux loss needs the router logits
    config._experts_implementation = demo.EXPERTS_IMPLEMENTATION  # the fastest experts kernel on CPU
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


model = make_model(k=2, aux_coef=AUX_COEF)
n_params = sum(p.numel() for p in model.parameters())
n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
print(f"{n_params / 1e6:.2f} M parameters, {n_expert / 1e6:.2f} M in experts; each token uses 2 of 8 experts, "
      f"so {(n_params - n_expert * 6 / 8) / 1e6:.2f} M are active per token")
model.model.layers[0].mlp

# %% [markdown]
# ## The training loop
#
# A plain language-model loop: random windows of `SEQ_LEN` tokens from the stream, next-token cross-entropy,
# AdamW. `model(input_ids, labels=...)` returns `loss` = language-model loss + `router_aux_loss_coef` x
# `aux_loss`. Checkpoints are saved with `save_pretrained`, so any of them loads back with
# `mr.load_model(path)`.

# %%
def train(name: str, *, k: int = 2, aux_coef: float = AUX_COEF, steps: int = STEPS, seed: int = SEED,
          checkpoints: list[int] = ()) -> tuple[dict[int, str], pd.DataFrame]:
    """Train a fresh tiny MoE; return {step: checkpoint directory} and the per-step losses."""
    model = make_model(k, aux_coef, seed)
    rng = np.random.default_rng(seed)  # the same batches for every run with this seed
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    saved, log = {}, []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps + 1):
        if step in checkpoints or step == steps:
            path = mr_runs / "teaching" / name / f"step-{step:04d}"
            demo.save_checkpoint(model, tokenizer, path)  # save_pretrained of the model and the tokenizer
            saved[step] = str(path)
        if step == steps:
            break
        starts = rng.integers(0, len(stream) - SEQ_LEN, size=BATCH)
        ids = torch.as_tensor(np.stack([stream[s:s + SEQ_LEN] for s in starts]))
        warm, cos = min(1.0, (step + 1) / 10), 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = LR * warm * (0.1 + 0.9 * cos)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = out.aux_loss.item()
        log.append({"run": name, "step": step, "lm_loss": out.loss.item() - aux_coef * aux, "aux_loss": aux})
    print(f"{name}: {steps} steps in {time.perf_counter() - t0:.0f} s, last-20 LM loss "
          f"{np.mean([r['lm_loss'] for r in log[-20:]]):.2f}")
    return saved, pd.DataFrame(log)


def watch_routing(path: str) -> tuple[mr.RoutingTrace, float]:
    """Load a checkpoint, run the watch set through it inside mr.capture: (routing trace, held-out loss)."""
    model, _ = mr.load_model(path)
    with torch.inference_mode(), mr.capture(model) as rec:
        loss = demo.mean_loss(model, watch, pad)  # the same batches in the same order every time
    return rec.trace(), loss


# %% [markdown]
# ## Two runs: with and without the load-balancing loss
#
# Left alone, a router tends to fall into a rich-get-richer loop: an expert that happens to be chosen a
# little more often gets more gradient, becomes a little better, and is chosen even more often. Most tokens
# end up on a few experts while the others idle. The *auxiliary load-balancing loss* (Switch Transformer)
# pushes back. Per layer, with f_e = the fraction of routing slots that went to expert e and P_e = the
# router's mean probability for e,
#
# ```
# aux_loss = E * sum_e  f_e * P_e          (E = number of experts)
#
# balanced:  f_e = k/E, P_e = 1/E   ->  aux_loss = k        (its minimum; 2 for top-2)
# collapsed: one expert takes all   ->  aux_loss grows towards E * k
# ```
#
# It is added to the language-model loss with a small weight (`router_aux_loss_coef`; Switch used 0.01,
# Qwen3 0.001). For each seed we train the same model from the same initial weights on the same batches
# twice: once with the coefficient `AUX_COEF`, once with 0. The first seed's runs save checkpoints, which the
# next sections watch.
#
# ### Exercise: predict before training
#
# **Predict** before running the next cell: which run will end with the lower language-model loss, and
# which one with the more uneven expert loads? Write your guesses down; the sentences printed under the
# figures below and the table of the final models answer both.
#
# <details><summary>Hint (click to open)</summary>
#
# The balancing loss is a second objective: it can only cost language-model loss on the training batches
# (or leave it unchanged), but a router with more experts in use may generalise better to held-out text.
# Compare the training loss in the next figure with the held-out loss in the table further down.
# </details>

# %%
seeds = [SEED + i for i in range(N_SEEDS)]
RUN_NAMES = {"aux": f"aux loss x {AUX_COEF}", "no-aux": "no aux loss"}
runs, logs = {}, []
for seed in seeds:
    for run, coef in (("aux", AUX_COEF), ("no-aux", 0.0)):
        ckpts, log = train(f"{run}-seed{seed}", aux_coef=coef, seed=seed,
                           checkpoints=CHECKPOINTS if seed == SEED else ())
        runs[run, seed] = ckpts
        logs.append(log.assign(run=RUN_NAMES[run], seed=seed))
ckpt_aux, ckpt_none = runs["aux", SEED], runs["no-aux", SEED]
logs = pd.concat(logs, ignore_index=True)
smooth = logs.set_index(["run", "seed", "step"]).groupby(["run", "seed"])[["lm_loss", "aux_loss"]].transform(
    lambda s: s.rolling(10, min_periods=1).mean()).reset_index()
band = smooth.groupby(["run", "step"])[["lm_loss", "aux_loss"]].agg(["mean", "min", "max"])
fig = make_subplots(rows=1, cols=2, subplot_titles=("language-model loss", "load-balancing (aux) loss"))
colors = dict(zip(RUN_NAMES.values(), ("#4e79a7", "#e15759"), strict=True))
for col, measure in enumerate(("lm_loss", "aux_loss"), start=1):
    for run, color in colors.items():
        b = band.loc[run, measure]
        fig.add_scatter(x=list(b.index) + list(b.index[::-1]), y=list(b["max"]) + list(b["min"][::-1]),
                        fill="toself", fillcolor=color, opacity=0.2, line_width=0, hoverinfo="skip",
                        showlegend=False, row=1, col=col)
        fig.add_scatter(x=b.index, y=b["mean"], name=run, line_color=color, legendgroup=run,
                        showlegend=col == 1, row=1, col=col)
fig.update_xaxes(title_text="step")
fig.update_layout(height=380, title=f"Training losses (10-step moving average): mean of {len(seeds)} seeds, band: "
                  "lowest to highest seed")
fig

# %%
vocab_loss = math.log(len(tokenizer))
start = logs[logs["step"] == 0]["lm_loss"].mean()
end = logs[logs["step"] >= STEPS - 20].groupby(["run", "seed"])["lm_loss"].mean().unstack(0)
gap = mean_ci(end[RUN_NAMES["aux"]] - end[RUN_NAMES["no-aux"]])
aux_end = logs[logs["step"] >= STEPS - 20].groupby("run")["aux_loss"].mean()
aux_peak = band["aux_loss"]["mean"].groupby("run").max()
say(f"Left: the language-model loss starts at {start:.2f}, near a uniform guess among {len(tokenizer)} tokens",
    f"(ln {len(tokenizer)} = {vocab_loss:.2f}), and ends (last 20 steps, mean of the seeds) at",
    " and ".join(f"{end[r].mean():.2f} ({r})" for r in end.columns) + ".",
    f"The balancing loss costs {fmt_ci(gap)} nats of training loss (aux minus no aux, mean over seeds,",
    f"{CI:.0%} interval):", "above 0, so the balancing loss has a price." if gap["low"] > 0 else
    "the interval includes 0, a cost the seeds cannot tell apart from none." if gap["high"] >= 0 else
    "below 0, so here the balancing loss even helped.",
    f"Right: the auxiliary loss starts near its balanced value k = {model.config.num_experts_per_tok}; its seed-mean peaks at",
    " and ".join(f"{aux_peak[r]:.2f} ({r})" for r in aux_peak.index), "and ends at",
    " and ".join(f"{aux_end[r]:.2f} ({r})" for r in aux_end.index) + ".")

# %% [markdown]
# ## Watching the routing form
#
# Each saved checkpoint of the first seed's runs is loaded back and the held-out watch set is run through it
# inside `mr.capture`. *Router saturation* (OLMoE, Muennighoff et al. 2024) asks, for each checkpoint, what
# share of a token's top-k experts are the same ones the final model chooses: 1 means the routing has
# settled, k/E is what an unrelated random router would share.

# %%
watched = {}
for run, ckpts in (("aux", ckpt_aux), ("no-aux", ckpt_none)):
    for step, path in ckpts.items():
        watched[run, step] = watch_routing(path)
final_aux = watched["aux", STEPS][0]
saturation = pd.concat([
    mr.metrics.router_agreement(trace, final_aux).assign(step=step)
    for (run, step), (trace, _) in watched.items() if run == "aux" and step < STEPS
], ignore_index=True)
saturation["layer"] = "layer " + saturation["layer"].astype(str)
fig = px.line(saturation, x="step", y="agreement", color="layer", markers=True,
              title=f"Router saturation: top-2 overlap with the final model (step {STEPS}); dotted: random router")
fig.add_hline(y=float(saturation["random"].iloc[0]), line_dash="dot", line_color="grey")
fig.update_yaxes(range=[0, 1], title_text="top-2 overlap with the final model")
fig.update_layout(height=400)
fig

# %%
sat = saturation.pivot(index="step", columns="layer", values="agreement")
chance = float(saturation["random"].iloc[0])
past_half = {la: (sat.index[sat[la] > 0.5].min() if (sat[la] > 0.5).any() else None) for la in sat.columns}
near_chance = sat.index[(sat < 1.5 * chance).all(axis=1)]
say(f"A random router would share {chance:.2f} of the final choices.",
    f"Up to step {near_chance.max()} every layer stays below 1.5 times that: the experts are still nearly"
    " interchangeable and the routers' preferences churn." if len(near_chance) else
    "Already the first checkpoint shares more than 1.5 times that.",
    "The first checkpoint with more than half of the final choices in place:",
    ", ".join(f"{la}: step {st}" if st is not None else f"{la}: none" for la, st in past_half.items()) + ";",
    f"the last saved checkpoint (step {sat.index.max()}) agrees on {span(sat.iloc[-1], '.0%')} of them.",
    "In OLMoE the same happens over a trillion tokens, with most choices fixed within the first percent of"
    " pretraining (and there the later layers settle first).")

# %% [markdown]
# ## Load balance over training
#
# The coefficient of variation (CV) of the experts' loads in a layer is std / mean of the slot counts: 0 is
# perfect balance, 1 means the loads spread as widely as their mean. Random routing of the same tokens gives
# a small CV from sampling noise alone (`cv_random`). The curves follow the first seed's two runs.

# %%
balance = pd.concat([
    mr.metrics.load_balance(trace).assign(run=run, step=step, heldout_loss=loss)
    for (run, step), (trace, loss) in watched.items()
], ignore_index=True)
balance["run"] = balance["run"].map(RUN_NAMES)
balance["layer"] = "layer " + balance["layer"].astype(str)
fig = px.line(balance, x="step", y="cv", color="run", line_dash="layer", markers=True,
              title="Load imbalance over training (CV of expert loads on the watch set)")
fig.update_yaxes(rangemode="tozero", title_text="coefficient of variation")
fig.update_layout(height=420)
fig

# %%
cvs = balance.pivot_table(index="step", columns=["run", "layer"], values="cv")
peak = cvs.max()
say(f"At step 0 the CV is {span(cvs.iloc[0])} (random routing: {span(balance['cv_random'], '.3f')}).",
    "The highest CV along training:", "; ".join(f"{r}, {la}: {v:.2f} at step {cvs[(r, la)].idxmax()}"
                                               for (r, la), v in peak.items()) + ".",
    "At the end:", "; ".join(f"{r}, {la}: {v:.2f}" for (r, la), v in cvs.iloc[-1].items()) + ".")

# %% [markdown]
# ## The final models side by side
#
# Each cell is one expert's share of its layer's routing slots (the first seed's runs; the dotted line is the
# fair share 1/E).

# %%
final_none = watched["no-aux", STEPS][0]
loads = pd.concat([mr.metrics.expert_load(final_aux).assign(run=RUN_NAMES["aux"]),
                   mr.metrics.expert_load(final_none).assign(run=RUN_NAMES["no-aux"])], ignore_index=True)
loads["layer"] = "decoder layer " + loads["layer"].astype(str)
fig = px.bar(loads, x="expert", y="share", color="run", barmode="group", facet_row="layer",
             title=f"Expert load after {STEPS} steps, with and without the load-balancing loss (seed {SEED})")
fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
fig.add_hline(y=1 / TINY["num_experts"], line_dash="dot", line_color="grey")
fig.update_xaxes(dtick=1)
fig.update_yaxes(tickformat=".0%", title_text="share")
fig.update_layout(height=520)
fig

# %%
def dropped(trace: mr.RoutingTrace, capacity_factor: float) -> float:
    """Share of routing slots over capacity when the whole watch set is one batch (mean over layers)."""
    load = mr.metrics.expert_load(trace)
    capacity = capacity_factor * load.groupby("layer")["count"].transform("mean")  # x (tokens x k / E)
    over = (load["count"] - capacity).clip(lower=0)
    return float((over.groupby(load["layer"]).sum() / load.groupby("layer")["count"].sum()).mean())


finals = []  # one row per (setting, seed): the final model on the watch set
for (run, seed), ckpts in runs.items():
    trace, loss = watched[run, STEPS] if seed == SEED else watch_routing(ckpts[STEPS])
    lb = mr.metrics.load_balance(trace)
    finals.append({"run": RUN_NAMES[run], "k": 2 if run == "aux" else None, "seed": seed, "held-out loss": loss,
                   "mean CV": lb["cv"].mean(), "last-layer CV": lb["cv"].iloc[-1],
                   "busiest / mean": lb["max_over_mean"].max(), "dead experts": int(lb["dead"].sum()),
                   "cv_random": lb["cv_random"].max(), "dropped at capacity 1.25": dropped(trace, 1.25)})
finals = pd.DataFrame(finals)
measures = ["held-out loss", "mean CV", "last-layer CV", "busiest / mean", "dropped at capacity 1.25"]
table = finals.groupby("run")[measures].agg(lambda x: fmt_ci(mean_ci(x)))
table.columns.name = f"mean over {len(seeds)} seeds [{CI:.0%} interval]"
table

# %%
def interval_plot(df: pd.DataFrame, x: str, panels: list[str], title: str):
    """One panel per measure: each seed as a dot, the mean with its interval as a bar."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels)
    for col, m in enumerate(panels, start=1):
        ci = df.groupby(x, sort=False)[m].apply(mean_ci).unstack()
        fig.add_scatter(x=df[x].astype(str), y=df[m], mode="markers", marker={"color": "#bab0ac", "size": 7},
                        name="one seed", showlegend=col == 1, row=1, col=col)
        fig.add_scatter(x=ci.index.astype(str), y=ci["mean"], mode="markers", marker={"color": "#4e79a7", "size": 12},
                        error_y={"type": "data", "symmetric": False, "array": ci["high"] - ci["mean"],
                                 "arrayminus": ci["mean"] - ci["low"]},
                        name=f"mean, {CI:.0%} interval", showlegend=col == 1, row=1, col=col)
        fig.update_yaxes(rangemode="tozero", row=1, col=col)
    fig.update_layout(height=380, title=title)
    return fig


interval_plot(finals, "run", ["held-out loss", "last-layer CV"],
              f"With and without the load-balancing loss after {STEPS} steps, {len(seeds)} seeds")

# %%
diff = finals.pivot(index="seed", columns="run", values=["held-out loss", "last-layer CV"])
loss_gap = mean_ci(diff[("held-out loss", RUN_NAMES["no-aux"])] - diff[("held-out loss", RUN_NAMES["aux"])])
cv_gap = mean_ci(diff[("last-layer CV", RUN_NAMES["no-aux"])] - diff[("last-layer CV", RUN_NAMES["aux"])])
worst = loads[loads["run"] == RUN_NAMES["no-aux"]].sort_values("share").iloc[-1]
say(f"Over {len(seeds)} seeds, leaving the balancing loss out changes the held-out loss by {fmt_ci(loss_gap)} nats",
    f"(no aux minus aux, {CI:.0%} interval) and the last layer's CV by {fmt_ci(cv_gap, '.2f')}.",
    "The balancing loss costs held-out loss here." if loss_gap["high"] < 0 else
    "The seeds cannot tell the two held-out losses apart." if loss_gap["low"] <= 0 else
    "Without it the held-out loss is higher.",
    f"In seed {SEED}'s run without it, the busiest expert ({worst['layer']}, expert {worst['expert']}) takes",
    f"{worst['share']:.0%} of its layer's slots, {worst['load_ratio']:.1f} times its fair share;",
    (f"{int(finals['dead experts'].sum())} experts are completely dead over all final models."
     if finals["dead experts"].sum() else "no expert is completely dead in any final model."),
    "In long runs without balancing, experts that stop receiving tokens stop learning and rarely come back.")

# %% [markdown]
# **Capacity.** On a real system the experts of a layer sit on different GPUs, and a batch is only as fast
# as its busiest expert. Switch Transformer and GShard therefore give every expert a fixed capacity,
#
# ```
# capacity = capacity_factor x (tokens in the batch x k) / E
# ```
#
# and drop the routing slots that overflow it (the token skips that expert; its residual connection carries
# it on). The last column of the table applies this to the watch set taken as one batch. Qwen3 itself is
# "dropless" (it never drops a slot), but the busiest expert still sets the pace. (`mr.metrics.capacity_drop`
# simulates the same per sequence, as Switch Transformer groups tokens.)

# %%
drop = finals.groupby("run")["dropped at capacity 1.25"].mean()
say("At a capacity factor of 1.25 the router would lose", " and ".join(
    f"{d:.0%} of its slots ({r})" for r, d in drop.items()) + f", mean over {len(seeds)} seeds.")

# %% [markdown]
# ### Exercise: the capacity factor
#
# **Predict**: with a capacity factor of 1 (each expert takes at most its fair share) and of 2, does the
# dropped share go up or down compared with 1.25, and which run (with or without the balancing loss) drops
# more? Then write the cell that computes it for the final models of seed `SEED` (use `dropped` above).
#
# <details><summary>Solution (click to open)</summary>
#
# A smaller factor drops more, a larger one less (at a factor of E / k = 4 nothing can overflow). The less
# balanced run is expected to drop more, because its busiest experts overflow first; the table says whether
# it does at every factor on this run:
#
# ```python
# pd.DataFrame({f: {RUN_NAMES[r]: dropped(watched[r, STEPS][0], f) for r in ("aux", "no-aux")}
#               for f in (1, 1.25, 2)}).rename_axis(columns="capacity factor")
# ```
# </details>

# %%
# your answer here (the solution is hidden above)

# %% [markdown]
# ## How many experts per token? top-k = 1, 2, 4
#
# k trades compute for capacity: each token runs k experts. We train the same model with each k of `TOP_KS`
# (the k = 2 runs are the ones above), for every seed, and compare held-out loss and balance after the same
# number of steps.
#
# ### Exercise: k = 1 with and without renormalisation
#
# Qwen3 renormalises the chosen experts' weights to sum to 1 (`norm_topk_prob=True`). **Predict** before
# running the next cell: with k = 1 and renormalisation, how large is the gradient that the language-model
# loss alone (no auxiliary loss) sends to the router's weights? And with k = 1 and *no* renormalisation
# (`norm_topk_prob=False`, the weight is the router's probability itself)? Then run the cell: it does one
# forward and backward pass of each setting on the same batch and prints the router gradient's norm.
#
# <details><summary>Solution (click to open)</summary>
#
# With renormalisation the single weight is p / p, exactly 1 whatever the logits are, so its derivative
# with respect to the router logits is zero: the language-model loss sends the router no gradient at all
# (the printed norm is zero up to floating-point rounding, orders of magnitude below the others), and only the
# auxiliary loss trains it. Without renormalisation the weight is p,
# which depends on the logits, so the gradient is non-zero. Switch Transformer (k = 1) uses the raw
# probability as the weight for this reason. With k = 2 the two renormalised weights p1 / (p1 + p2) and
# p2 / (p1 + p2) still depend on the logits, so renormalisation is harmless there.
# </details>

# %%
def router_grad_norm(k: int, norm_topk_prob: bool) -> float:
    """Norm of d(LM loss)/d(router weights), summed over layers, for one batch of the stream (no aux loss)."""
    m = make_model(k, aux_coef=0.0, norm_topk_prob=norm_topk_prob)
    ids = torch.as_tensor(np.stack([stream[s:s + SEQ_LEN] for s in np.random.default_rng(SEED).integers(
        0, len(stream) - SEQ_LEN, size=BATCH)]))
    m(input_ids=ids, labels=ids).loss.backward()  # aux_coef = 0: the language-model loss alone
    grads = [p.grad for n, p in m.named_parameters() if n.endswith("mlp.gate.weight")]
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


grad_table = pd.DataFrame([{"k": k, "norm_topk_prob": norm, "router gradient norm (LM loss only)":
                            router_grad_norm(k, norm)} for k, norm in ((1, True), (1, False), (2, True))])
grad_table

# %%
g = grad_table.set_index(["k", "norm_topk_prob"])["router gradient norm (LM loss only)"]
say(f"k = 1 with renormalisation: router gradient norm {g[1, True]:.3g}; without: {g[1, False]:.3g};",
    f"k = 2 with renormalisation: {g[2, True]:.3g}.",
    f"The renormalised k = 1 router's gradient is {g[1, False] / max(g[1, True], 1e-300):.1e} times smaller than"
    " without renormalisation: rounding error only, so it learns nothing from the language-model loss, as the"
    " solution says." if g[1, True] < 1e-4 * g[1, False] else
    "This differs from the solution's reasoning: look at the router code.")

# %% [markdown]
# The top-k runs below keep Qwen3's renormalisation, so their k = 1 router is trained by the auxiliary loss
# alone.

# %%
results = []
for seed in seeds:
    for k in TOP_KS:
        if k == 2:
            row = finals[(finals["seed"] == seed) & (finals["k"] == 2)].iloc[0]
            results.append({"k": k, "seed": seed, "held-out loss": row["held-out loss"], "mean CV": row["mean CV"],
                            "CV of random routing": row["cv_random"]})
            continue
        ckpt, _ = train(f"top{k}-seed{seed}", k=k, aux_coef=AUX_COEF, seed=seed)
        trace, loss = watch_routing(ckpt[STEPS])
        lb = mr.metrics.load_balance(trace)
        results.append({"k": k, "seed": seed, "held-out loss": loss, "mean CV": lb["cv"].mean(),
                        "CV of random routing": lb["cv_random"].max()})
topk = pd.DataFrame(results)
topk_table = topk.groupby("k")[["held-out loss", "mean CV"]].agg(lambda x: fmt_ci(mean_ci(x)))
topk_table["active expert MLPs per token"] = [k * TINY["num_hidden_layers"] for k in topk_table.index]
topk_table.columns.name = f"mean over {len(seeds)} seeds [{CI:.0%} interval]"
topk_table

# %%
interval_plot(topk, "k", ["held-out loss", "mean CV"], f"Effect of top-k after {STEPS} steps, {len(seeds)} seeds")

# %%
by_k = {k: mean_ci(g["held-out loss"]) for k, g in topk.groupby("k")}
best_k = min(by_k, key=lambda k: by_k[k]["mean"])
apart = [k for k in by_k if k != best_k and by_k[k]["low"] > by_k[best_k]["high"]]
cv_k = topk.groupby("k")["mean CV"].mean()
say("Held-out loss by k:", "; ".join(f"k = {k}: {fmt_ci(r)}" for k, r in by_k.items()) + ".",
    f"k = {best_k} has the lowest mean;",
    (f"its interval lies below those of k = {', '.join(map(str, apart))}." if apart else
     "its interval overlaps every other k's: after this many steps the seeds do not tell the settings apart."),
    f"Mean CV by k: {', '.join(f'{c:.2f}' for c in cv_k)} (k = {', '.join(map(str, cv_k.index))}):",
    "with more experts per token the loads are more even by construction." if cv_k.is_monotonic_decreasing else
    "not monotone in k.",
    "A router that barely moves from its random start (like k = 1's, the trap above) sends each token id to a fixed"
    " expert, like a hash, which Roller et al. (2021) found competitive too.")

# %% [markdown]
# ## Check
#
# Two results of this notebook, asserted from the numbers above: (1) the routing settles over training:
# saturation rises with the checkpoint step (Spearman correlation at least `SPEARMAN_MIN`) and the last saved
# checkpoint shares more of the final top-2 choices than the first by more than three standard errors; (2) the
# runs without the load-balancing loss end less balanced than the runs with it: the mean over seeds of the
# last layer's CV gap exceeds three times the CV that sampling noise alone gives (`cv_random`).

# %%
per_step = saturation.groupby("step")["agreement"].mean()
rho = per_step.reset_index().corr(method="spearman").loc["step", "agreement"]
first, last = per_step.iloc[0], per_step.iloc[-1]
se = math.sqrt(last * (1 - last) / (final_aux.num_tokens * final_aux.top_k))
assert rho >= SPEARMAN_MIN and last - first > 3 * se, (rho, first, last, se)
noise = float(finals["cv_random"].max())
assert cv_gap["mean"] > 3 * noise, (cv_gap, noise)
print(f"saturation: {first:.2f} at step {per_step.index[0]} -> {last:.2f} at step {per_step.index[-1]} "
      f"(Spearman {rho:.2f}, threshold {SPEARMAN_MIN}); last-layer CV gap without - with aux loss "
      f"{fmt_ci(cv_gap, '.2f')} > 3 x {noise:.3f}; per seed: "
      + ", ".join(f"{s}: {g:.2f}" for s, g in (diff[("last-layer CV", RUN_NAMES["no-aux"])]
                                               - diff[("last-layer CV", RUN_NAMES["aux"])]).items()))
print(f"notebook ran in {time.perf_counter() - started:.0f} s (this process used {time.process_time() - cpu_started:.0f} s of CPU)")
