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
# # Per-language routing: do languages get their own experts?
#
# Qwen3's MoE models are trained on 119 languages. Does the router send German, Japanese and Arabic text to
# different experts, at which depth, and how much of that is learned rather than a side effect of each
# language having its own tokens? This notebook measures it on parallel sentences (the same `key` in every
# language): expert usage per language, the Jensen-Shannon divergence between every pair of languages, the
# entropy-normalised divergence to English over depth (Bandarkar et al. 2025), language-specific vs shared
# experts, how well a linear probe recovers the language from the chosen experts, and the normalised mutual
# information between language and first-choice expert against a shuffled-label floor. One sentence is then
# shown token by token in three languages. On the demo, every number is compared with the same model at its
# initial weights (untrained): an untrained router already routes each token id to a fixed, random expert, so
# only the difference between the two is learning. Set `MODEL` to a Hugging Face id and `CORPUS = "flores"`
# for the real study on FLORES-200.

# %% tags=["parameters"]
MODEL = "demo"  # "demo" or a Hugging Face id / local path of an MoE causal LM
RUNS = "../runs"  # relative to notebooks/ (the repository's runs/, shared with make demo); trace directories (captured on first use)
CORPUS = "demo"  # "demo" (held-out split of the parallel demo corpus) or "flores" (FLORES-200 devtest, real models)
LANGS = None  # None: every captured language; or a subset, e.g. ["en", "de", "fr", "zh", "ja", "ar"]
REFERENCE = "en"  # the reference language of the divergence over depth
PARALLEL_LANGS = ["en", "de", "ja"]  # the token view of one parallel sentence
PROBE_TOKENS = 12_000  # tokens the language probe trains and tests on (whole documents)
N_BOOT = 100  # bootstrap replicates for confidence intervals

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
import numpy as np
import pandas as pd
import plotly.express as px
from transformers import AutoTokenizer

import moe_routing as mr
import moe_routing.plots as mp
from moe_routing.demo_pipeline import demo_runs, model_variants
from moe_routing.models import resolve_model_path

mp.use_theme()
part = "heldout" if CORPUS == "demo" else CORPUS
paths = demo_runs(MODEL, RUNS, parts=(part,), progress=False)
variants = list(model_variants(MODEL))  # demo: ["trained", "untrained"]; a real model: ["model"]


def load(variant: str) -> mr.RoutingTrace:
    trace = mr.RoutingTrace.load(paths[f"{variant}/{part}"])
    return trace if LANGS is None else trace.select(np.isin(trace.label("lang"), LANGS))


traces = {v: load(v) for v in variants}
name = variants[0]
trace = traces[name]
langs = sorted(set(trace.label("lang").tolist()))
scripts = pd.Series(trace.label("script")).groupby(trace.label("lang")).agg(lambda s: s.mode()[0]).to_dict()
order = sorted(langs, key=lambda lang: (scripts[lang] != "Latin", scripts[lang], lang))  # by writing system
tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MODEL))  # only to show tokens as text
for v, t in traces.items():
    print(f"{v:>9}: {t!r}")
per_lang = pd.Series(trace.label("lang")).value_counts()
print(f"{len(langs)} languages, {per_lang.min()}-{per_lang.max()} tokens each "
      f"({len(np.unique(trace.doc_ids))} sentences)")

# %% [markdown]
# ## Which experts does each language use?
#
# Rows are languages (Latin script first, then by writing system), columns experts, one heatmap per layer
# (slider). Colour is the lift: the expert's share of the language's routing slots divided by its share over
# all languages. 1 (white) is no preference, red means the language uses the expert more than average, blue
# less; the scale stops at 4 (hover for the exact value).

# %%
mp.language_usage_heatmap(trace, languages=order,
                          title=f"Expert preference by language (lift) · {name} model · {part}")

# %% [markdown]
# Every language with its own script has an expert it uses 4 to 24 times more than average, in every layer;
# the Latin-script languages share one paler pattern, with lifts of 2-3 (a few rarely used experts aside,
# such as the one Indonesian uses 26 times more in layer 1). By layer 3 the strongest preferences belong to
# Hebrew, Hindi, Thai and Georgian (lifts 16-24). The blank column in layer 0 is expert 15, which no token
# of this set reaches.

# %% [markdown]
# ## How far apart are two languages' routing distributions?
#
# For every pair of languages and every layer, the Jensen-Shannon divergence (in bits, 0 = identical, 1 =
# disjoint experts) between their expert-usage distributions. Languages are ordered by writing system, so
# blocks along the diagonal are script families.

# %%
divergence = {v: mr.metrics.language_divergence(t, n_boot=0, n_shuffles=2) for v, t in traces.items()}
mp.language_divergence_heatmap(divergence[name], order,
                               title=f"JS divergence between languages' expert usage · {name} model")

# %%
pairs = pd.concat([d.assign(model=v) for v, d in divergence.items()], ignore_index=True)
pairs["same_script"] = np.where(pairs["a"].map(scripts) == pairs["b"].map(scripts), "same script",
                                "different scripts")
script_table = pairs.pivot_table(index=["model", "layer"], columns="same_script", values="js").round(3)
script_table["shuffled floor"] = pairs.groupby(["model", "layer"])["floor"].mean().round(4)
script_table

# %% [markdown]
# In the trained model two languages of different scripts diverge by about 0.5-0.6 bits in every layer,
# ten times more than two languages of the same script (0.03-0.08): the router has sorted the languages
# by writing system. The untrained model shows the same ordering at a tenth of the size (about 0.04 vs
# 0.02 bits): different scripts use different token ids, and a random router already sends each id to its
# own expert, so some separation comes for free. Both are far above the shuffled-label floor.

# %% [markdown]
# ## Divergence from English over depth (Bandarkar et al. 2025)
#
# Per layer, the Jensen-Shannon divergence between a language's routing distribution and English's,
# divided by their mean entropy (so that layers with peaked and flat routing compare). Here each language's
# distribution is the mean over its sentences; error bars are 95% bootstrap intervals over sentences.

# %%
reference = {v: mr.metrics.reference_divergence(t, "lang", REFERENCE, n_boot=N_BOOT) for v, t in traces.items()}
mp.divergence_to_reference(reference[name], reference=REFERENCE)

# %%
paired = {v: mr.metrics.reference_divergence(t, "lang", REFERENCE, pair_label="key", n_boot=0)
          for v, t in traces.items()}
depth = pd.concat([
    reference[v].groupby("layer")["divergence"].mean().rename(f"{v}: language means")
    for v in traces
] + [
    paired[v].groupby("layer")["divergence"].mean().rename(f"{v}: per parallel sentence")
    for v in traces
], axis=1).round(3)
depth

# %% [markdown]
# Latin-script languages sit close to English (Italian, Polish, Indonesian below 0.01), the other scripts
# far (Bengali, Hebrew, Hindi around 0.45-0.55). The paper finds a U shape over depth, lowest in the middle
# layers, where Qwen3's 48 layers share more experts across languages; the 4-layer demo has no middle to
# speak of and its divergence peaks in layer 2. The table also shows why the language means are used here:
# compared sentence by sentence with its English translation (the paper's per-sentence version,
# `pair_label="key"`), the short demo strings (about 10 tokens) give a divergence that is almost as large
# for the untrained model as for the trained one, because a handful of tokens cannot fill a 16-expert
# distribution. On FLORES sentences (25-50 tokens) the per-sentence version is the one to read.

# %% [markdown]
# ## Language-specific and shared experts
#
# An expert is *specific* to a language when that language puts it among its top-k at least 10 percentage
# points more often than any other language; *shared* when every language uses it at least at the uniform
# rate k/E and no language more than 10 points above another; *other* otherwise.

# %%
experts = pd.concat([mr.metrics.language_experts(t).assign(model=v) for v, t in traces.items()],
                    ignore_index=True)
kinds = experts.groupby(["model", "layer", "kind"]).size().rename("experts").reset_index()
fig = px.bar(kinds, x="layer", y="experts", color="kind", facet_col="model", barmode="stack",
             category_orders={"kind": ["specific", "shared", "other"]},
             color_discrete_map={"specific": "#e15759", "shared": "#59a14f", "other": "#bab0ac"},
             title="Language-specific and shared experts per layer")
fig.update_xaxes(dtick=1, title_text="decoder layer")
fig.update_layout(height=380)
fig

# %%
specific = experts[(experts["model"] == name) & (experts["kind"] == "specific")].copy()
specific["language"] = specific["lang"].map(mp.language_name)
specific.pivot_table(index="language", columns="layer", values="expert",
                     aggfunc=lambda e: " ".join(f"e{x}" for x in sorted(e))).fillna("")

# %% [markdown]
# The trained model grows from 4 language-specific experts in layer 0 to 7 of 16 in layer 3, almost all for
# languages with their own script (Georgian, Hebrew, Hindi, Korean, Arabic ...). The exception is
# Vietnamese: Latin letters, but so many diacritics that its text is cut into tokens no other language
# uses. The untrained model has one specific expert in layer 0 and none after.
# No expert qualifies as *shared* in either: the Latin-script languages all lean on the same experts, which
# the scripts without Latin letters hardly touch, so no expert is used evenly by all 24 languages.

# %% [markdown]
# ## Can the language be read off the experts?
#
# Two views of the same question. A logistic-regression probe predicts a token's language from the multi-hot
# vector of its top-k experts in one layer (train and test sets split by sentence); chance is always
# predicting the most frequent language. The normalised mutual information I(language; top-1 expert) /
# H(language) is 0 when the first choice says nothing about the language and 1 when it determines it; its
# floor is the same number after shuffling the language labels.

# %%
probe = pd.concat([mr.metrics.label_probe(t, "lang", max_tokens=PROBE_TOKENS).assign(model=v)
                   for v, t in traces.items()], ignore_index=True)
mp.divergence_over_depth(probe, value="accuracy", color="model", floor="chance",
                         title="Language probe accuracy from the chosen experts; dashed: majority-class chance")

# %% [markdown]
# From one token's two experts the trained model's probe names the language (of 24) right about a third of
# the time in layers 1-3, five to six times chance (0.057). On the untrained model it stays near chance in
# layers 0-2 and gains a few points in layer 3 only.

# %%
nmi = pd.concat([mr.metrics.label_nmi(t, "lang").assign(model=v) for v, t in traces.items()], ignore_index=True)
mp.nmi_by_layer(nmi, color="model",
                title="NMI(language; first-choice expert) by layer; dashed: shuffled-label floor")

# %% [markdown]
# The first-choice expert carries about a third of the language's entropy in the trained model (highest in
# layer 2), against 0.02-0.04 in the untrained one. The untrained values are 10-20 times their shuffled
# floor (about 0.001): that is the token-hash effect, real but small.

# %% [markdown]
# ## One sentence in three languages
#
# The same demo string in three languages, each token coloured by its first-choice expert (the slider moves
# through the layers; hover for both experts and their weights). Expert colours are the same in all three.

# %%
docs = pd.DataFrame({"doc": trace.doc_ids, "lang": trace.label("lang"), "key": trace.label("key")})
sizes = docs.groupby(["key", "lang", "doc"]).size().rename("tokens").reset_index()
shown = sizes[sizes["lang"].isin(PARALLEL_LANGS)].groupby("key").filter(
    lambda g: g["lang"].nunique() == len(set(PARALLEL_LANGS)) and g["tokens"].max() <= 40)
longest = shown.groupby("key")["tokens"].min().idxmax()  # the longest sentence that fits on a line or two
sentence = shown[shown["key"] == longest].drop_duplicates("lang").set_index("lang")["doc"]
figures = {lang: mp.token_expert_text(trace, int(sentence[lang]), tokenizer=tokenizer, line_chars=70, width=900,
                                      title=f"{mp.language_name(lang)} · first-choice expert · {name} model")
           for lang in PARALLEL_LANGS}
figures[PARALLEL_LANGS[0]]

# %%
figures[PARALLEL_LANGS[1]]

# %%
figures[PARALLEL_LANGS[2]]

# %%
first = trace.top1()


def first_choices(lang: str, li: int) -> set[int]:
    return set(first[trace.doc_ids == sentence[lang], li].tolist())


ref = PARALLEL_LANGS[0]
pd.DataFrame({
    f"{mp.language_name(lang)}: experts shared with {mp.language_name(ref)}":
        [f"{len(first_choices(lang, li) & first_choices(ref, li))} of {len(first_choices(lang, li))}"
         for li in range(trace.num_layers)]
    for lang in PARALLEL_LANGS[1:]
}, index=pd.Index(trace.layers, name="layer"))

# %% [markdown]
# The English and German versions are written with the same alphabet and many of their tokens go to the same
# first-choice experts; the Japanese version is routed to a different set of experts from layer 0 on, and
# the table counts how few first choices it shares with English in each layer.

# %% [markdown]
# ## Learned or free? Trained vs untrained
#
# The numbers above side by side. The margin the trained model must clear is computed from the data: NMI is
# recomputed on the two halves of the sentences (even and odd document ids), and the largest difference
# between halves, over models and layers, estimates how much NMI moves by sampling alone.

# %%
def best_nmi(t: mr.RoutingTrace) -> float:
    return float(mr.metrics.label_nmi(t, "lang", n_shuffles=0)["nmi"].max())


halves = {v: [best_nmi(t.select(t.doc_ids % 2 == h)) for h in (0, 1)] for v, t in traces.items()}
noise = max(abs(a - b) for a, b in halves.values())
summary = pd.DataFrame({
    "best-layer NMI": nmi.groupby("model")["nmi"].max(),
    "shuffled floor": nmi.groupby("model")["floor"].mean(),
    "best-layer probe accuracy": probe.groupby("model")["accuracy"].max(),
    "probe chance": probe.groupby("model")["chance"].first(),
    "JS, different scripts": pairs[pairs["same_script"] == "different scripts"].groupby("model")["js"].mean(),
    "JS, same script": pairs[pairs["same_script"] == "same script"].groupby("model")["js"].mean(),
}).round(3)
print(f"split-half noise of the best-layer NMI: {noise:.4f}")
summary

# %% [markdown]
# ## Check
#
# The key result, asserted: on the demo, the trained router separates languages better than the untrained
# one, in NMI by more than three times the split-half noise and in probe accuracy; with a real model (no
# untrained twin) the best layer's NMI must clear its shuffled floor by the same margin.

# %%
nmi_best = nmi.groupby("model")["nmi"].max()
margin = 3 * max(noise, 1e-3)
if "untrained" in traces:
    gap = nmi_best["trained"] - nmi_best["untrained"]
    assert gap > margin, f"trained - untrained best-layer NMI = {gap:.3f}, not above the margin {margin:.3f}"
    probe_best = probe.groupby("model")["accuracy"].max()
    assert probe_best["trained"] > probe_best["untrained"], probe_best
    print(f"NMI: trained {nmi_best['trained']:.3f} vs untrained {nmi_best['untrained']:.3f} "
          f"(gap {gap:.3f} > margin {margin:.3f}); probe: {probe_best['trained']:.3f} vs "
          f"{probe_best['untrained']:.3f}")
else:
    excess = nmi_best[name] - nmi.loc[nmi["model"] == name, "floor"].max()
    assert excess > margin, f"best-layer NMI is only {excess:.3f} above its floor (margin {margin:.3f})"
    print(f"NMI {nmi_best[name]:.3f} clears its floor by {excess:.3f} > margin {margin:.3f}")
