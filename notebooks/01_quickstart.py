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
# # Quickstart: capture what the router decided
#
# A Mixture-of-Experts layer sends every token to a few of its experts (top-k). This notebook loads a model,
# runs a handful of prompts in several languages through it inside `mr.capture`, and looks at the result: a
# `RoutingTrace` with one row per real token and, per MoE layer, the experts it went to and their weights. We
# colour the text by each token's first-choice expert, look at the full router distribution of one prompt,
# turn the trace into a tidy frame, save it as Parquet shards and query the shards with DuckDB. By default it
# runs on the embedded demo model (a tiny Qwen3-MoE: 4 layers, 16 experts, top-2, trained on CPU in ~3 min on
# Django's UI strings in 24 languages); set `MODEL` to a Hugging Face id such as `"Qwen/Qwen3-30B-A3B"` to
# run the same cells on a real model.

# %% tags=["parameters"]
MODEL = "demo"  # "demo" or a Hugging Face id / local path of an MoE causal LM
RUNS = "../runs"  # relative to notebooks/ (the repository's runs/, shared with make demo); where traces are written
DEVICE = None  # device_map: None = "auto" when a GPU (CUDA/MPS) is present, else the CPU; or "cpu", "cuda:0", ...
DTYPE = "auto"  # weights dtype: "auto" (the checkpoint's), "bfloat16", "float32", ...
CORPUS = "demo"  # corpus of the pipeline run (this notebook uses only PROMPTS; kept for a uniform report)
PART = "heldout"
LANGS = None  # languages of the pipeline run (None: the corpus's default)
CORPUS_FALLBACK = None  # set by the pipeline: why FLORES+ was not used (None: it was, or not asked for)
STABILITY_DTYPES = ("float32", "bfloat16")  # converted in place; float32 needs twice a 16-bit model's memory
LAYER = None  # decoder layer of the router heatmap (None: the last MoE layer)
PROMPTS = [
    "Enter a valid email address.",
    "Geben Sie eine gültige E-Mail-Adresse ein.",
    "Introduzca una dirección de correo electrónico válida.",
    "Введите правильный адрес электронной почты.",
    "请输入一个有效的电子邮件地址。",
    "有効なメールアドレスを入力してください。",
    "أدخل عنوان بريد إلكتروني صحيح.",
]

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a kernel without ipywidgets

from pathlib import Path

import duckdb
import numpy as np
import torch
from IPython.display import Markdown, display
from transformers.utils import logging as hf_logging

import moe_routing as mr
import moe_routing.plots as mp

hf_logging.disable_progress_bar()  # no weight-loading bars in the page
mp.use_theme()
from moe_routing.models import input_device, to_input_device

model, tokenizer = mr.load_model(MODEL, device_map=DEVICE, dtype=DTYPE)
print(type(model).__name__, "·", sum(p.numel() for p in model.parameters()) / 1e6, "M parameters ·",
      next(model.parameters()).dtype, "· inputs on", input_device(model))

# %% [markdown]
# ## Capture
#
# `mr.capture(model)` is a context manager: inside it, every forward call of the model is recorded. The
# prompts go in as one padded batch; capture reads the attention mask of the call and keeps only the real
# tokens, so the trace never contains padding. The tokenizer's tensors go to the model's input device
# (`to_input_device`: where the input embeddings live, also when accelerate spreads the layers over GPUs).

# %%
batch = to_input_device(model, tokenizer(PROMPTS, return_tensors="pt", padding=True))
with torch.inference_mode(), mr.capture(model) as rec:
    model(**batch)
trace = rec.trace(labels={"prompt": np.arange(len(PROMPTS))})
trace

# %% [markdown]
# The repr names the model, the number of real tokens, the MoE layers (decoder-layer indices), experts per
# layer and top-k. The arrays have named dimensions: `expert_ids` and `weights` are `[tokens, layers, k]`.

# %%
print("expert_ids", trace.expert_ids.shape, trace.expert_ids.dtype)
print("weights   ", trace.weights.shape, trace.weights.dtype)
print("padded batch:", tuple(batch["input_ids"].shape), "->", int(batch["attention_mask"].sum()), "real tokens")

# %% [markdown]
# ## The text, coloured by first-choice expert
#
# Each token's background is the colour of the expert with the largest routing weight (as in Fig. 8 of the
# Mixtral paper). Use the slider to move through the layers; hover a token for its top-k experts and weights.

# %%
mp.token_expert_text(trace, doc_id=0, tokenizer=tokenizer, line_chars=60, width=900)

# %%
mp.token_expert_text(trace, doc_id=4, tokenizer=tokenizer, line_chars=60, width=900)

# %% [markdown]
# Within one short prompt the colours already change from token to token: experts are chosen per token, not
# per sentence, and the same token can go elsewhere in another layer. In the Chinese prompt, the demo's small
# byte-level vocabulary splits many characters into pieces; a piece that holds only part of a character's
# UTF-8 bytes is shown as those bytes (`⟨e794⟩`).

# %% [markdown]
# ## The full router distribution of one prompt
#
# `capture(model, logits=True)` also records every router's raw logits (`[tokens, layers, experts]`), so we
# can see the whole probability distribution, not just the top-k that was kept. Squares mark the chosen
# experts.

# %%
one = to_input_device(model, tokenizer(PROMPTS[:1], return_tensors="pt"))
with torch.inference_mode(), mr.capture(model, logits=True) as rec_logits:
    model(**one)
trace_logits = rec_logits.trace()
layer = trace_logits.layers[-1] if LAYER is None else LAYER
mp.router_heatmap(trace_logits, doc_id=0, layer=layer, tokenizer=tokenizer)

# %%
probs, _ = mp.router_probabilities(trace_logits, layer)
top = np.sort(probs, axis=1)[:, ::-1]
top1, kept = top[:, 0].mean(), top[:, :trace.top_k].sum(axis=1).mean()
display(Markdown(
    f"In layer {layer} the top-1 expert gets a mean probability of {top1:.2f}, {top1 * trace.num_experts:.1f} times "
    f"the 1/E = {1 / trace.num_experts:.3f} of a uniform router, and the top-{trace.top_k} together {kept:.2f}: "
    + ("most of the probability mass lies on the experts that were *not* kept." if kept < 0.5 else
       "most of the probability mass lies on the kept experts.")))

# %% [markdown]
# The top-k weights the experts' outputs are multiplied with are the kept probabilities, renormalised to sum
# to 1 when the model's config says so (`norm_topk_prob`).

# %% [markdown]
# ## A tidy frame
#
# `trace.to_frame()` has one row per (token, layer, slot) with the labels as columns: ready for pandas,
# seaborn or a groupby.

# %%
frame = trace.to_frame()
frame.head()

# %%
frame.groupby(["layer", "expert"]).size().unstack(fill_value=0)

# %%
reached = (frame.groupby(["layer", "expert"]).size().unstack(fill_value=0) > 0).sum(axis=1)
display(Markdown(f"Routed slots per layer and expert: {len(PROMPTS)} short prompts reach "
                 f"{reached.min()}-{reached.max()} of the {trace.num_experts} experts of a layer, unevenly. How "
                 "uneven, and what it costs, is the subject of notebook 02."))

# %% [markdown]
# ## Save, load, and query the shards
#
# `trace.save(path)` writes a trace directory: a JSON manifest and Parquet shards, one row per token with
# `expert_ids` and `weights` as nested fixed-size lists (`[layers][k]`). `RoutingTrace.load` reads it back
# exactly. (`mr.capture_corpus` writes the same layout for whole corpora, shard by shard.)

# %%
path = trace.save(Path(RUNS) / MODEL.replace("/", "_") / "quickstart", overwrite=True)
loaded = mr.RoutingTrace.load(path)
print(path, "->", sorted(p.name for p in (path / "shards").iterdir()))
print("round trip exact:", loaded.equals(trace))

# %% [markdown]
# DuckDB reads the shards in place. Nested lists are 1-based: `expert_ids[2][1]` is the first slot of the
# second MoE layer. Here: per prompt, how many tokens, and how often each expert was the first slot at the
# last MoE layer.

# %%
shards = str(path / "shards" / "*.parquet")
last = len(trace.layers)  # 1-based index of the last MoE layer
duckdb.sql(f"""
    SELECT prompt, count(*) AS tokens,
           mode(expert_ids[{last}][1]) AS most_common_first_slot,
           round(avg(weights[{last}][1]), 3) AS mean_first_weight
    FROM read_parquet('{shards}')
    GROUP BY prompt ORDER BY prompt
""").df()

# %%
favourites = duckdb.sql(f"""
    SELECT prompt, mode(expert_ids[{last}][1]) AS favourite FROM read_parquet('{shards}') GROUP BY prompt
""").df()["favourite"]
display(Markdown(f"The {len(favourites)} prompts (one per language) have {favourites.nunique()} different favourite "
                 "first-slot experts" + (": a first glimpse of the language specialization that notebook 03 "
                                         "measures on thousands of texts." if favourites.nunique() > 1 else ".")))

# %% [markdown]
# ## Check: padding never leaks into the trace
#
# A second, independent capture runs every prompt on its own (batch of one, so no padding at all). The trace
# must hold exactly the real tokens of the batch, none of them a pad token, in order.

# %%
with torch.inference_mode(), mr.capture(model) as rec_single:
    for p in PROMPTS:
        model(**to_input_device(model, tokenizer([p], return_tensors="pt")))
single = rec_single.trace()

real = int(batch["attention_mask"].sum())
expected_ids = batch["input_ids"][batch["attention_mask"].bool()].cpu().numpy()
print(f"tokens: batch {trace.num_tokens}, singles {single.num_tokens}, real {real}")
assert trace.num_tokens == single.num_tokens == real, "the trace must hold exactly the real tokens"
assert np.array_equal(trace.token_ids, expected_ids), "token ids must be the unpadded input ids, in order"
assert np.array_equal(single.token_ids, trace.token_ids), "the same tokens, batched or one by one"
if tokenizer.pad_token_id != tokenizer.eos_token_id:
    assert tokenizer.pad_token_id not in trace.token_ids, "a pad token leaked into the trace"
assert loaded.equals(trace), "save/load must round-trip exactly"

# %% [markdown]
# ## What is exact, and what depends on the batch
#
# Capture is exact: the trace is the routing of the batch that ran. Whether the *same prompt* gets the same
# experts in another batch is a property of the model's arithmetic: padding and batch size change the shapes
# of the matrix products, so their rounding, and a near-tie between two router scores can flip. bfloat16 (how
# real checkpoints run) keeps 8 significand bits to float32's 24, so its rounding is 2^16 times coarser and
# flips need far less of a tie. `mr.metrics.routing_stability`
# measures it: the share of tokens whose first-choice expert (top-1) or set of experts (top-k) differs from the
# prompts run one by one, per layer, for batch sizes and padding sides, in each dtype, and against float32.

# %%
from moe_routing.metrics import routing_stability, stability_summary

stability = routing_stability(model, tokenizer, PROMPTS, batch_sizes=(1, 4, len(PROMPTS)),
                              dtypes=STABILITY_DTYPES)
summary = stability_summary(stability)
summary

# %%
fp32 = summary[summary["dtype"] == "float32"]
bf16 = summary[summary["dtype"] == "bfloat16"]
assert not fp32.empty and not bf16.empty, "STABILITY_DTYPES must include float32 and bfloat16 for this text"
bf16_batched = bf16[bf16["batch_size"] > 1]
display(Markdown(
    f"In float32, batching changed the top-k set of {fp32['topk_changed'].max():.2%} of the tokens at most "
    f"(largest weight difference among unchanged sets {fp32['max_weight_diff'].max():.1e}). In bfloat16, up to "
    f"{bf16_batched['topk_changed'].max():.2%} of the tokens changed their top-k set and "
    f"{bf16_batched['top1_changed'].max():.2%} their top-1 expert with the batch (weights up to "
    f"{bf16['max_weight_diff'].max():.1e} apart), and the bfloat16 weights alone, batch of one, changed the "
    f"top-k set of {bf16[bf16['batch_size'] == 1]['topk_vs_fp32'].max():.2%} of the tokens against float32. "
    "Compare routing across runs in 16-bit only with this spread in mind; each trace itself is exact."))
