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
# # Causal checks: do a language's experts matter for that language?
#
# Notebook 04 finds *language-specific* experts from routing statistics: experts that one language selects far
# more often than any other. Statistics alone do not say that an expert matters (a 2026 causal audit of MoE
# routing found that utilisation, norms and routing weights barely predict what ablating an expert does). This
# notebook tests the claims causally, with `mr.intervene`: it removes each language's experts and measures the
# change of the next-token loss (NLL, nats per predicted token) on every language, against two controls computed
# in the same pass: the same forward run twice (the noise floor) and random expert sets of the same size in the
# same layers. Then it bans each expert of one layer in turn, compares three ways of removing an expert, and
# steers English generation toward Russian by biasing the router.
#
# The experts are *picked* on one half of the held-out parallel sentences and *tested* on the other half (split
# by sentence key), so a set is never tested on the text it was chosen from. On the demo the model is the small
# trained demo model; set `MODEL` to a Hugging Face id and `CORPUS = "flores"` for the real study.

# %% tags=["parameters"]
MODEL = "demo"  # "demo" or a Hugging Face id / local path of an MoE causal LM
RUNS = "../runs"  # relative to notebooks/ (the repository's runs/, shared with make demo); trace directories
CORPUS = "demo"  # "demo" (held-out split of the parallel demo corpus) or "flores" (FLORES-200 devtest)
LANGS = None  # None: every language of the corpus; or a subset, e.g. ["en", "de", "ru", "ja", "ar"]
DEVICE = None  # device_map: None = "auto" with a GPU present, else the CPU
DTYPE = "auto"  # weights dtype ("auto": the checkpoint's)
N_RANDOM = 4  # random expert sets per language set (the control)
MAX_PER_LANG = 40  # test texts per language (None: the whole test half)
N_BOOT = 200  # bootstrap replicates (over texts) for the intervals
CI = 0.95  # confidence level of the intervals
MODES = ["reroute", "zero", "renormalize"]  # the first one is the claims' mode
IMPORTANCE_LAYER = None  # None: the layer with the most language-specific experts
STEER_FROM, STEER_TO = "en", "ru"  # steer prompts of this language toward that one
STEER_TOP = 4  # experts promoted (and suppressed) per layer
STEER_DELTAS = [0, 4, 8]  # bias offsets tried (router-logit units)
N_PROMPTS = 32  # prompts generated from
NEW_TOKENS = 12  # tokens generated per prompt (greedy)
BATCH_SIZE = 64
SEED = 0

# %%
import hashlib
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
import numpy as np
import pandas as pd
import plotly.express as px
import torch
from IPython.display import Markdown, display

import moe_routing as mr
import moe_routing.plots as mp
from moe_routing.corpora import char_script, guess_script
from moe_routing.demo_pipeline import load_part
from moe_routing.models import load_model, to_input_device
from moe_routing.plots import causal as mpc

started = time.perf_counter()


def say(*parts: str) -> None:
    """A sentence computed from the data, shown as markdown."""
    display(Markdown(" ".join(p for p in parts if p)))


def names(values) -> str:
    return ", ".join(mp.language_name(v) for v in values) or "none"


mp.use_theme()
torch.manual_seed(SEED)
part = "heldout" if CORPUS == "demo" else CORPUS
runs = mr.open_runs(MODEL, RUNS, (part,), dtype=DTYPE, device_map=DEVICE, langs=LANGS, progress=False)
name = runs.variants[0]  # demo: the trained model; a real model: "model"
trace = runs[name][part].read()
model, tokenizer = load_model(MODEL, dtype=DTYPE, device_map=DEVICE)
texts = load_part(part, langs=LANGS)
if LANGS is not None:
    trace = trace.select(np.isin(trace.label("lang"), LANGS))


def half(key) -> int:
    """0 = the half the experts are picked on, 1 = the half they are tested on (a stable hash of the key)."""
    return int(hashlib.sha256(str(key).encode()).hexdigest(), 16) % 2


pick = trace.select(np.array([half(k) == 0 for k in trace.label("key")]))
test = texts[texts["key"].map(half) == 1]
if MAX_PER_LANG is not None:
    test = test.groupby("lang", group_keys=False).head(MAX_PER_LANG)
test = test.reset_index(drop=True)
langs = sorted(set(test["lang"]))
print(f"{name} model: {trace.num_layers} MoE layers x {trace.num_experts} experts, top-{trace.top_k}")
print(f"picking half: {pick.num_tokens} tokens of {len(np.unique(pick.doc_ids))} texts; "
      f"test half: {len(test)} texts in {len(langs)} languages")

# %% [markdown]
# ## The experts under test
#
# `language_experts` (on the picking half): an expert is specific to a language when that language selects it
# at least ten percentage points more often than any other language does; experts whose count rests on too few
# routing slots are dropped. Each language with at least one such expert gets one set (all its specific experts,
# in every layer); languages without one are not tested.

# %%
found = mr.metrics.language_experts(pick, "lang", n_boot=0)
specific = found[(found["kind"] == "specific") & ~found["too_few"]]
sets = {lang: {int(la): sorted(int(e) for e in g2["expert"]) for la, g2 in g.groupby("layer")}
        for lang, g in specific.groupby("lang") if lang in langs}
table = pd.DataFrame([{"language": mp.language_name(lang), "experts": sum(map(len, s.values())),
                       "set": "; ".join(f"L{la}: {', '.join(map(str, es))}" for la, es in s.items())}
                      for lang, s in sets.items()])
untested = [lang for lang in langs if lang not in sets]
say(f"{len(sets)} of {len(langs)} languages have specific experts ({len(specific)} experts in all);",
    f"without any: {names(untested)}.")
table

# %%
counts = specific.groupby(["lang", "layer"]).size().rename("experts").reset_index()
counts["language"] = counts["lang"].map(mp.language_name)
fig = px.bar(counts, x="language", y="experts", color=counts["layer"].astype(str),
             title=f"Language-specific experts per language and layer · {name} model · picking half",
             labels={"color": "layer"})
fig.update_layout(height=380)
fig

# %% [markdown]
# ## The ablation matrix
#
# Rows: the language whose experts are removed (mode `reroute`: the router selects as if the experts did not
# exist, each token gets its next choice). Columns: the language evaluated. A cell is the mean change of NLL per
# token on that language's test texts, with a bootstrap interval over texts (level `CI`). For each set, `N_RANDOM`
# random sets of the same size in the same layers are removed too; a star marks cells whose interval lies above
# the random sets' interval for that language.
#
# The claim "these experts serve language X" holds (`check_claim`) when the effect on X has its interval above
# (a) the pooled effect on the other languages, (b) the random sets' effect on X and (c) the repeat-noise
# floor. One shared pass computes the clean forward once per batch; each claim equals what `check_claim` gives
# for that set alone.

# %%
t0 = time.perf_counter()
result = mr.metrics.ablation_matrix(model, tokenizer, test, sets, by="lang", modes=MODES, n_random=N_RANDOM,
                                    n_boot=N_BOOT, ci=CI, batch_size=BATCH_SIZE, seed=SEED, progress=False)
matrix_seconds = time.perf_counter() - t0
frame, claims = result.frame, result.claims
print(f"ablation matrix: {len(sets)} sets x {len(MODES)} modes + {N_RANDOM} random sets each, "
      f"{matrix_seconds:.0f} s")
mpc.ablation_matrix_heatmap(frame, mode=MODES[0],
                            title=f"NLL change when a language's experts are banned · {name} model · test half")

# %%
cell = frame[frame["mode"] == MODES[0]].copy()
cell["shown"] = [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(cell["delta"], cell["ci_low"],
                                                                          cell["ci_high"], strict=True)]
shown = cell.pivot(index="set", columns="lang", values="shown").reindex(index=list(sets), columns=langs)
shown.index = [mp.language_name(x) for x in shown.index]
shown

# %%
noise = frame.groupby("lang")["noise"].agg(lambda s: float(np.abs(s).max()))
floors = result.frame.attrs["noise_conditions"]
summary = pd.DataFrame([{
    "language": mp.language_name(lang), "experts": sum(map(len, sets[lang].values())),
    "own": str(c.target), "others": str(c.others), "random sets": str(c.random),
    "beats random sets": f"{c.beats_random:.0%}", "repeat noise": f"{c.noise.delta:+.3g}",
    "holds": c.holds} for lang, c in claims.items()])
print(f"noise floors measured: {', '.join(floors)}; the largest repeat difference over all languages: "
      f"{noise.max():.3g} nats/token")
summary

# %%
mpc.claims_plot(claims, title=f"Own language vs other languages vs random sets ({MODES[0]}) · {name} model")

# %%
holding = [lang for lang, c in claims.items() if c.holds]
failing = {lang: c.reasons for lang, c in claims.items() if not c.holds}
diag = np.array([claims[lang].target.delta for lang in claims])
rand = np.array([claims[lang].random.delta for lang in claims])
off = cell[(cell["set"] != cell["lang"])]["delta"].to_numpy(float)
say(f"The claim holds for {len(holding)} of {len(claims)} languages ({names(holding)}).",
    f"On average the diagonal (a language's own experts removed, its own NLL) changes by {diag.mean():+.3f}"
    f" nats/token, an off-diagonal cell by {off.mean():+.3f}, and random sets change the target language by"
    f" {rand.mean():+.3f}; the diagonal exceeds its random sets' mean for {(diag > rand).sum()} of {len(diag)}"
    " languages.",
    "The repeat forward differs by at most" f" {noise.max():.3g} nats/token, so the floor does not limit these"
    " comparisons." if noise.max() < 1e-6 else f"The repeat forward differs by up to {noise.max():.3g} nats/token.")
for lang, reasons in failing.items():
    say(f"**{mp.language_name(lang)}**: the claim does not hold: {'; '.join(reasons)}.")
for lang in list(claims)[:3]:
    print(claims[lang].sentence)

# %% [markdown]
# ## Expert importance in one layer
#
# `expert_importance` bans each expert of one layer alone (reroute) and measures the NLL change on every
# language: a row per expert, a column per language. Outlined cells are the layer's language-specific experts
# in their own language's column. If routing statistics pointed at the experts that matter, the outlined cells
# would be the largest of their rows.

# %%
by_layer = specific.groupby("layer").size()
layer = int(IMPORTANCE_LAYER if IMPORTANCE_LAYER is not None else
            (by_layer.idxmax() if len(by_layer) else trace.layers[-1]))
t0 = time.perf_counter()
importance = mr.metrics.expert_importance(model, tokenizer, test, layer, by="lang", n_boot=N_BOOT, ci=CI,
                                          batch_size=BATCH_SIZE, seed=SEED, progress=False)
importance_seconds = time.perf_counter() - t0
marks = {int(r.expert): r.lang for r in specific[specific["layer"] == layer].itertuples()}
print(f"layer {layer}: {len(marks)} language-specific experts; {importance_seconds:.0f} s")
mpc.importance_heatmap(importance, marks=marks,
                       title=f"Each expert of layer {layer} banned in turn · {name} model · test half")

# %%
imp = importance.pivot(index="expert", columns="lang", values="delta")
top_lang = imp.idxmax(axis=1)
own_top = [e for e, lang in marks.items() if top_lang.get(e) == lang]
strongest = imp.max(axis=1).sort_values(ascending=False)
say(f"Of layer {layer}'s {len(marks)} language-specific experts, {len(own_top)} hurt their own language most"
    f" when banned ({', '.join(f'expert {e}: {mp.language_name(marks[e])}' for e in own_top) or 'none'}).",
    f"The largest single-expert effect in this layer is expert {strongest.index[0]}'s"
    f" ({strongest.iloc[0]:+.3f} nats/token on {mp.language_name(top_lang[strongest.index[0]])}),"
    f" and {int((imp.max(axis=1) <= 0).sum())} of {len(imp)} experts raise no language's NLL when banned"
    " (its next choice does as well or better).")

# %% [markdown]
# ## Zero vs renormalize vs reroute
#
# Three ways to remove the same experts: `zero` deletes their output and keeps the other slots' weights (the
# token's mixture shrinks), `renormalize` deletes it and rescales the surviving weights to the original sum,
# `reroute` bans them before selection so each token gets its next-choice expert. Peers note that
# zero-ablation overstates an expert's role; here the three are compared on each language's own NLL (the
# diagonal of the matrix), with intervals.

# %%
mpc.modes_plot(frame, title=f"A language's own NLL change, three ablation modes · {name} model")

# %%
diag_modes = frame[frame["set"] == frame["lang"]].pivot(index="set", columns="mode", values="delta")[MODES]
display(diag_modes.rename(index=mp.language_name).round(4))
if {"zero", "reroute"} <= set(MODES):
    larger = int((diag_modes["zero"] > diag_modes["reroute"]).sum())
    say(f"Zero-ablation raises the own-language NLL more than rerouting for {larger} of {len(diag_modes)}"
        f" languages (mean {diag_modes['zero'].mean():+.3f} vs {diag_modes['reroute'].mean():+.3f} nats/token)",
        ": zero-ablation overstates the experts' role here." if larger > len(diag_modes) / 2 else
        ": on this model zero-ablation does not overstate the experts' role.")
if "renormalize" in MODES and "reroute" in MODES:
    say(f"Renormalizing gives a mean of {diag_modes['renormalize'].mean():+.3f} nats/token.")

# %% [markdown]
# ## Steering English toward Russian
#
# SteerMoE picks experts by the risk difference of their activation rates between two kinds of input
# (`steering_set`: the share of the target language's tokens that select the expert minus the share of the
# source language's). The `STEER_TOP` experts per layer with the largest positive difference get `+delta`
# on their router logit, the same number with the most negative difference get `-delta` (`steering_bias`), during
# greedy `generate()` from source-language prompts. Measured: the share of generations whose letters are mostly in
# the target language's script (`corpora.guess_script`), and the share of generated letters in that script;
# control: random sets of as many experts per layer, biased the same way. Steering works on this model when the
# steering set's share rises above every random set's.

# %%
lang_of = pick.label("lang")
steer = mr.metrics.steering_set(pick.select(lang_of == STEER_TO), pick.select(lang_of == STEER_FROM),
                                list(trace.layers), top=STEER_TOP)
target_script = pd.Series(pick.label("script")[lang_of == STEER_TO]).mode()[0]
prompts = test.loc[test["lang"] == STEER_FROM, "text"].head(N_PROMPTS).tolist()
tokenizer.padding_side = "left"
enc = to_input_device(model, tokenizer(prompts, return_tensors="pt", padding=True))  # where the embeddings live
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate(bias) -> list[str]:
    with torch.no_grad():
        if bias:
            with mr.intervene(model, bias=bias):
                out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=pad)
        else:
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=pad)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def in_script(texts_: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per generation: majority script is the target (0/1), target-script letters, all letters."""
    major = np.array([guess_script(t) == target_script for t in texts_], dtype=float)
    letters = [[s for s in map(char_script, t) if s] for t in texts_]
    hit = np.array([sum(s == target_script for s in x) for x in letters], dtype=float)
    return major, hit, np.array([len(x) for x in letters], dtype=float)


rng = np.random.default_rng(SEED)
boot = rng.poisson(1.0, size=(N_BOOT, len(prompts)))
n_per_layer = {la: (g["steer"] != "").sum() for la, g in steer.groupby("layer")}
rows, samples = [], {}
for delta in STEER_DELTAS:
    controls = [("steering set", -1, mr.metrics.steering_bias(steer, delta))]
    for s in range(N_RANDOM):
        picked = {la: rng.choice(trace.num_experts, size=n, replace=False) for la, n in n_per_layer.items()}
        controls.append(("random set", s, {la: {int(e): (delta if i % 2 == 0 else -delta) for i, e in enumerate(es)}
                                           for la, es in picked.items()}))
    for control, s, bias in controls:
        out = generate(bias if delta else None)
        major, hit, total = in_script(out)
        row = {"delta": delta, "control": control, "set": s, "share": major.mean(),
               "letters": hit.sum() / max(total.sum(), 1)}
        if control == "steering set":
            reps = (boot * major).sum(axis=1) / np.maximum(boot.sum(axis=1), 1)
            row["share_low"], row["share_high"] = np.quantile(reps, [(1 - CI) / 2, (1 + CI) / 2])
            samples[delta] = out[:3]
        rows.append(row)
steering = pd.DataFrame(rows)
print(f"target script: {target_script}; {len(prompts)} prompts x {NEW_TOKENS} new tokens; "
      f"{sum(n_per_layer.values())} experts steered over {len(n_per_layer)} layers")
mpc.steering_plot(steering, target=f"{target_script} script",
                  title=f"Steering {mp.language_name(STEER_FROM)} prompts toward {mp.language_name(STEER_TO)}"
                  f" · {name} model")

# %%
steering.pivot_table(index="delta", columns="control", values=["share", "letters"], aggfunc=["mean", "max"]).round(3)

# %%
for delta, out in samples.items():
    print(f"delta {delta}: " + " | ".join(repr(t) for t in out))
st_rows = steering[steering["control"] == "steering set"].set_index("delta")
rnd_max = steering[steering["control"] == "random set"].groupby("delta")[["share", "letters"]].max()
works = [d for d in STEER_DELTAS if d and (st_rows.at[d, "share"] > rnd_max.at[d, "share"]
                                           or st_rows.at[d, "letters"] > rnd_max.at[d, "letters"])]
best = st_rows["letters"].idxmax()
say(f"With the steering set, the share of generations mostly in {target_script} script goes"
    f" {' / '.join(format(st_rows.at[d, 'share'], '.0%') for d in STEER_DELTAS)} for deltas"
    f" {', '.join(map(str, STEER_DELTAS))}, and the share of {target_script} letters"
    f" {' / '.join(format(st_rows.at[d, 'letters'], '.1%') for d in STEER_DELTAS)};"
    f" the best random set reaches {rnd_max['letters'].max():.1%} of letters.",
    f"Steering beats every random set at deltas {', '.join(map(str, works))}: routing alone moves this model's"
    " output toward the target language there." if works else
    "The steering set does no better than random sets: on this model, biasing the router does not move the"
    " generated text toward the target language (its output language is not set by which experts run).")

# %% [markdown]
# ## Summary
#
# Each line below is computed from the runs above.

# %%
lines = [
    f"language sets tested: {len(claims)}; claims holding (own > others, > random sets, > noise): {len(holding)}",
    f"mean diagonal {diag.mean():+.3f} vs off-diagonal {off.mean():+.3f} vs random sets {rand.mean():+.3f} "
    "nats/token",
    f"repeat-noise floor: {noise.max():.3g} nats/token",
    f"layer {layer}: {len(own_top)} of {len(marks)} specific experts hurt their own language most",
    f"steering beats random sets at deltas: {works or 'none'}",
    f"notebook compute: {time.perf_counter() - started:.0f} s",
]
print("\n".join(lines))
