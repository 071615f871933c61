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
# # Comparing two conditions: which experts does a change of input or weights move?
#
# Many routing questions are comparisons: German vs French, a prompt with and without a system message, Qwen3
# thinking vs non-thinking mode, an early checkpoint vs the final one. This notebook shows the tools for it.
# For every layer and expert, `mr.metrics.contrast` gives the difference in the expert's share of routing
# slots between the two conditions, an effect size (Cohen's h) and a bootstrap confidence interval over
# documents; `contrast_summary` condenses a layer into one divergence with its shuffled-label floor; and
# `router_agreement` asks how often two sets of weights choose the same experts for the same tokens. On the
# demo: (a) German vs French parallel sentences, checked against a null contrast of German vs German;
# (b) the trained model vs its untrained initial weights. (c) compares Qwen3's thinking and non-thinking
# modes through the chat template; it runs when `MODEL` is a Qwen3 chat model and is skipped on the demo.

# %% tags=["parameters"]
MODEL = "demo"  # "demo" or a Hugging Face id / local path of an MoE causal LM
RUNS = "../runs"  # relative to notebooks/ (the repository's runs/, shared with make demo); trace directories (captured on first use)
DEVICE = None  # device_map of the pipeline run: None = "auto" with a GPU present, else the CPU
DTYPE = "auto"  # weights dtype of the pipeline run ("auto": the checkpoint's)
LANGS = None  # languages of the pipeline run (None: the corpus's default)
CORPUS_FALLBACK = None  # set by the pipeline: why FLORES+ was not used (None: it was, or not asked for)
CORPUS = "demo"  # "demo" (held-out split of the parallel demo corpus) or "flores" (FLORES-200, real models)
LANG_A, LANG_B = "de", "fr"  # the two languages of contrast (a)
OTHER_MODEL = None  # (b) for a real model: another checkpoint with the same tokenizer; the demo uses its untrained weights
N_BOOT = 1000  # bootstrap replicates over documents
THINKING_PROMPTS = [  # (c) Qwen3 chat models only
    "What is 17 * 23?",
    "Name three prime numbers larger than 50.",
    "Is a whale a fish? Answer briefly.",
    "Translate 'good morning' into German and French.",
    "If I have 3 apples and eat one, how many are left?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "Write a haiku about routers.",
    "What is the capital of Australia?",
]
MAX_NEW_TOKENS = 256  # (c) tokens generated per prompt and mode

# %%
import warnings
from dataclasses import replace

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

import moe_routing as mr
import moe_routing.plots as mp
from moe_routing.models import to_input_device


def say(*parts: str) -> None:
    """A sentence computed from the data, shown as markdown."""
    display(Markdown(" ".join(parts)))


def span(values, fmt: str = ".2f") -> str:
    """'a-b' over the values (or 'a' when both ends agree at this precision)."""
    values = pd.Series(values)
    lo, hi = f"{values.min():{fmt}}", f"{values.max():{fmt}}"
    return lo if lo == hi else f"{lo}-{hi}"


mp.use_theme()
part = "heldout" if CORPUS == "demo" else CORPUS
runs = mr.open_runs(MODEL, RUNS, (part,), dtype=DTYPE, device_map=DEVICE, langs=LANGS, progress=False)  # captures what is missing
variants = runs.variants  # demo: ["trained", "untrained"]; a real model: ["model"]
name = variants[0]
trace = runs[name][part].read()
other, other_name = None, None
if "untrained" in variants:
    other, other_name = runs["untrained"][part].read(), "untrained"
elif OTHER_MODEL:
    other_runs = mr.open_runs(OTHER_MODEL, RUNS, (part,), dtype=DTYPE, device_map=DEVICE, langs=LANGS, progress=False)
    other, other_name = other_runs.main[part].read(), str(OTHER_MODEL)
print(f"{name}: {trace!r}")
if other is not None:
    print(f"{other_name}: {other!r}")

# %% [markdown]
# ## (a) Two languages: German vs French
#
# The demo corpus is parallel, so both languages say the same things; they share the Latin alphabet and
# many subword tokens. `contrast` compares the share of routing slots each expert receives from German
# tokens with the share from French tokens. Every confidence interval comes from a Poisson bootstrap over
# documents (sentences), since the tokens of one sentence are not independent.

# %%
lang_a, lang_b = mp.language_name(LANG_A), mp.language_name(LANG_B)
langs = mr.metrics.contrast(trace, "lang", LANG_A, LANG_B, n_boot=N_BOOT)
mp.differential_usage(langs, label="lang", top_n=16,
                      title=f"Experts used more by {lang_a} (right) or {lang_b} (left); faded: 95% CI includes 0")

# %% [markdown]
# Each bar is one expert's difference in share of slots, with its 95% interval; the slider moves through the
# layers. Solid bars are the experts whose interval excludes 0.

# %%
mp.usage_difference_heatmap(langs, title=f"Share of slots, {lang_a} − {lang_b}, every layer and expert")

# %%
effects = langs.loc[langs["significant"], ["layer", "expert", "share_a", "share_b", "diff", "ci_low",
                                           "ci_high", "cohens_h", "log2_ratio"]]
effects.reindex(effects["cohens_h"].abs().sort_values(ascending=False).index).head(8).round(3)

# %%
sig = langs[langs["significant"]]
big_ratio = sig[sig["log2_ratio"].abs() > 1]
say(f"{len(sig)} of {len(langs)} (layer, expert) intervals exclude 0.",
    (f"The largest difference is {100 * sig['diff'].abs().max():.1f} percentage points of share and the largest"
     f" |Cohen's h| "
     f"{sig['cohens_h'].abs().max():.2f}" + (" (0.2 counts as a small effect): the effects are small." if
     sig["cohens_h"].abs().max() < 0.2 else " (0.2 counts as a small effect).")) if len(sig) else "",
    (f"{len(big_ratio)} of them differ by more than a factor of two (|log2 ratio| > 1), at shares of at most"
     f" {big_ratio[['share_a', 'share_b']].max().max():.1%}." if len(big_ratio) else ""))

# %% [markdown]
# Is that count a finding or what so many intervals give by chance? The null contrast below splits the
# *German* sentences into two halves by document id and compares them the same way: any significant expert
# there is a false positive.

# %%
def halves(chunk: mr.RoutingTrace) -> np.ndarray:
    return np.where(chunk.doc_ids % 2 == 0, "even", "odd")


lang_a_only = trace.where(lang=LANG_A)
null = mr.metrics.contrast(lang_a_only, halves, "even", "odd", n_boot=N_BOOT)
summary = pd.concat([
    mr.metrics.contrast_summary(trace, "lang", LANG_A, LANG_B, n_boot=N_BOOT).assign(
        contrast=f"{lang_a} vs {lang_b}"),
    mr.metrics.contrast_summary(lang_a_only, halves, "even", "odd", n_boot=N_BOOT).assign(
        contrast=f"{lang_a} vs {lang_a} (null: two halves)"),
], ignore_index=True)
mp.divergence_over_depth(summary, value="js", color="contrast", floor="floor", low="js_low", high="js_high",
                         title="JS divergence between the two conditions' expert usage; dashed: shuffled floor")

# %%
summary.pivot(index="layer", columns="contrast", values=["js", "floor", "n_significant"]).swaplevel(
    axis=1).sort_index(axis=1, level=0, sort_remaining=False).round(4)

# %%
pair = summary[summary["contrast"] == f"{lang_a} vs {lang_b}"].set_index("layer")
nul = summary[summary["contrast"] != f"{lang_a} vs {lang_b}"].set_index("layer")
times = pair["js"] / pair["floor"]
n_null_sig = int(null["significant"].sum())
say(f"{lang_a} vs {lang_b} is {span(times)} times its shuffled floor over the layers (most in layer",
    f"{times.idxmax()}, least in layer {times.idxmin()});",
    f"above it in {(times > 1).sum()} of {len(times)} layers.",
    f"The null contrast is {span(nul['js'] / nul['floor'])} times its floor, and {n_null_sig} of its {len(null)}",
    "intervals exclude 0" + (": the intervals are not too narrow, and the differences above are real."
                             if n_null_sig < max(len(sig), 1) / 2 else
                             ", as many as or more than half the real contrast's: read those with care."))

# %% [markdown]
# The bootstrap interval of a divergence lies above the divergence itself when it is near 0: resampling can
# only add apparent difference. Read the point value against the floor.

# %% [markdown]
# ## (b) Two checkpoints: trained vs untrained weights
#
# The same tokens through two sets of weights. `router_agreement` (OLMoE's "router saturation") is the mean
# share of a token's top-k experts that both routers choose, and the share of tokens with the same first
# choice; independent random routers agree at k/E and 1/E.

# %%
if other is None:
    agreement = None
    print("skipped: no second checkpoint (the demo compares with its untrained weights; for a real model set "
          "OTHER_MODEL to another checkpoint with the same tokenizer).")
else:
    agreement = mr.metrics.router_agreement(other, trace)
    long = pd.concat([
        agreement.assign(measure=f"top-{trace.top_k} overlap", value=agreement["agreement"],
                         baseline=agreement["random"]),
        agreement.assign(measure="same first choice", value=agreement["top1"], baseline=agreement["random_top1"]),
    ], ignore_index=True)
    fig = mp.divergence_over_depth(long, value="value", color="measure", floor="baseline", low=None, high=None,
                                   title=f"Agreement of the {other_name} and the {name} router on the same "
                                   "tokens; dashed: random routers")
    fig.update_yaxes(title_text="agreement", range=[0, 1])
    display(fig)
    display(agreement.round(3))

# %%
if agreement is not None:
    lift = agreement["agreement"] / agreement["random"]
    say(f"The {other_name} and {name} routers share {span(agreement['agreement'], '.1%')} of their",
        f"top-{trace.top_k} choices and {span(agreement['top1'], '.1%')} of their first choices over the layers,",
        f"against {agreement['random'].iloc[0]:.2%} and {agreement['random_top1'].iloc[0]:.2%} for two unrelated",
        f"random routers ({span(lift, '.1f')} times random).",
        "Whatever the one router did with each token id, the other does something else." if lift.max() < 2 else "")

# %%
if other is not None:
    weights = mr.metrics.contrast_traces(trace, other, names=(name, other_name), n_boot=N_BOOT)
    display(mp.usage_difference_heatmap(
        weights, title=f"Share of slots, {name} − {other_name} weights, same tokens"))
    print("experts whose share changed (95% CI excludes 0), per layer:",
          weights.groupby("layer")["significant"].sum().to_dict())

# %%
if other is not None:
    moved = weights.groupby("layer")["significant"].sum()
    up, down = weights.loc[weights["diff"].idxmax()], weights.loc[weights["diff"].idxmin()]
    say(f"{span(moved, '.0f')} of the {trace.num_experts} experts per layer receive a clearly different share.",
        f"The largest gain: expert {up.expert} of layer {up.layer}, from {up.share_b:.1%} of the slots",
        f"({other_name}) to {up.share_a:.1%} ({name}); the largest loss: expert {down.expert} of layer {down.layer},",
        f"from {down.share_b:.1%} to {down.share_a:.1%}.")

# %% [markdown]
# The pairing matters here: both traces hold the same documents, so each bootstrap replicate resamples the same
# sentences on both sides and the intervals measure the effect of the weights, not of which sentences were
# drawn.

# %% [markdown]
# ## (c) Qwen3: thinking vs non-thinking mode
#
# Qwen3's chat template has a switch, `enable_thinking`: with it on, the model first writes its reasoning
# between `<think>` and `</think>`, then the answer; with it off, the template closes an empty think block and
# the model answers at once. The cell below generates an answer to each prompt in both modes inside
# `mr.capture`, keeps the generated tokens, and compares (1) thinking vs non-thinking
# mode and (2) within thinking mode, the reasoning tokens vs the answer tokens. The same prompt has the same
# document id in both modes, so the bootstrap pairs them. It runs only when the model's chat template knows
# `enable_thinking`.

# %%
tokenizer = mr.load_tokenizer(MODEL)  # the model's own tokenizer (its chat template)
template = tokenizer.chat_template or ""
thinking = None
if "enable_thinking" not in template:
    print(f"skipped: {MODEL!r} has no chat template with enable_thinking (the demo has no chat template at "
          "all). Set MODEL to a Qwen3 chat model, e.g. 'Qwen/Qwen3-30B-A3B', to run this section.")
else:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = mr.load_model(MODEL, device_map="auto")

    def generate(enable_thinking: bool) -> mr.RoutingTrace:
        """Routing of the generated tokens of every prompt in one mode (one document per prompt)."""
        prompt_of, generated = [], []
        with torch.inference_mode(), mr.capture(model) as rec:
            for i, prompt in enumerate(THINKING_PROMPTS):  # one at a time: no padding; stops at end of turn
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=enable_thinking)
                batch = to_input_device(model, tokenizer(text, return_tensors="pt"))
                before = rec.num_tokens
                model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
                n, n_prompt = rec.num_tokens - before, batch["input_ids"].shape[1]
                prompt_of += [i] * n
                generated += [False] * n_prompt + [True] * (n - n_prompt)
        t = rec.trace(labels={"prompt": prompt_of, "generated": generated})
        # the prompt is the document: the bootstrap resamples prompts, paired across the two modes
        return replace(t, doc_ids=t.label("prompt").astype(np.int64)).where(generated=True)

    thinking = {mode: generate(mode) for mode in (True, False)}
    for mode, t in thinking.items():
        print(f"enable_thinking={mode}: {t.num_tokens} generated tokens")
    modes = mr.metrics.contrast_traces(thinking[True], thinking[False], names=("thinking", "non-thinking"),
                                       n_boot=N_BOOT)
    display(mp.differential_usage(modes))
    display(mr.metrics.contrast_summary(thinking[True], other=thinking[False], n_boot=N_BOOT).round(4))

# %%
if thinking is not None:
    end_think = tokenizer.convert_tokens_to_ids("</think>")
    t = thinking[True]
    segment = np.full(t.num_tokens, "answer", dtype=object)
    for doc in np.unique(t.doc_ids):
        idx = np.flatnonzero(t.doc_ids == doc)  # in generation order
        hit = np.flatnonzero(t.token_ids[idx] == end_think) if end_think is not None else np.array([], int)
        segment[idx[: (hit[0] + 1) if hit.size else len(idx)]] = "reasoning"
    t = t.with_labels(segment=segment.astype(str))
    counts = pd.Series(segment).value_counts().to_dict()
    print("tokens per segment:", counts)
    if len(counts) == 2:
        segments = mr.metrics.contrast(t, "segment", "reasoning", "answer", n_boot=N_BOOT)
        display(mp.differential_usage(segments))
        display(mr.metrics.contrast_summary(t, "segment", "reasoning", "answer", n_boot=N_BOOT).round(4))
    else:
        print("no answer tokens after </think> within MAX_NEW_TOKENS: raise MAX_NEW_TOKENS to compare segments.")

# %% [markdown]
# On a Qwen3 model, read these the same way as (a): bars whose interval excludes 0, and the per-layer
# divergence against its floor. With a handful of prompts the intervals are wide: the bootstrap resamples
# prompts, not tokens.

# %% [markdown]
# ## Check
#
# (a) The language contrast has experts whose interval excludes 0, more than the null contrast of German vs
# German has (whose 95% intervals exclude 0 about once in twenty by chance), and its divergence clears the
# shuffled floor in at least one layer. (b) On the demo, the two checkpoints agree much less than identical
# routers would: their top-k overlap is closer to the random baseline than to 1 in every layer.

# %%
def check(holds: bool, claim: str) -> None:
    """Assert a headline claim on the demo; for another MODEL, say whether it holds."""
    assert holds or "untrained" not in variants, f"does not hold on the demo: {claim}"
    print(("holds: " if holds else f"does not hold for {MODEL}: ") + claim)


n_sig, n_null = int(langs["significant"].sum()), int(null["significant"].sum())
lang_rows = summary[summary["contrast"] == f"{lang_a} vs {lang_b}"]
check(n_sig > n_null, f"(a) {n_sig} of {len(langs)} experts differ between {lang_a} and {lang_b}, more than the "
      f"null contrast's {n_null}")
check(bool((lang_rows["js"] > 2 * lang_rows["floor"]).any()),
      f"(a) the divergence ({lang_rows['js'].max():.4f} at most) clears twice its floor in at least one layer")
if agreement is not None:
    midway = (1 + agreement["random"]) / 2
    check(bool((agreement["agreement"] < midway).all()),
          f"(b) top-{trace.top_k} agreement {agreement['agreement'].min():.3f}-{agreement['agreement'].max():.3f} is "
          f"below the midway {midway.iloc[0]:.3f} between random ({agreement['random'].iloc[0]:.3f}) and 1")
