"""Thinking vs non-thinking segments on a local Qwen3-style chat model directory built here.

The model is a tiny real Qwen3MoeForCausalLM whose weights are set so that greedy decoding walks a fixed chain:
a few chain tokens get embeddings that dominate one hidden dimension each (so the final norm points along it),
and lm_head maps that dimension to the next token of the chain. In thinking mode the template leaves the prompt
inside an open <think>; the model writes two tokens, emits </think>, answers with two tokens and <|im_end|>. In
non-thinking mode the template closes the span itself and the model answers at once.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import moe_routing as mr
from moe_routing.errors import SettingError
from moe_routing.segments import (
    combine_modes,
    generate_segments,
    segment_counts,
    segment_labels,
    supports_thinking,
    think_token_ids,
    thinking_contrasts,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's structure (Qwen3-2507 thinking variant: the generation prompt opens the span); the test tokenizer
# keeps "\n" apart from the markers, so the template ends on the marker itself.
TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think></think>' }}"
    "{%- else %}{{ '<think>' }}{%- endif %}{%- endif %}"
)


def make_chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Let me think about it. So the answer is yes.", "What is two plus two?"] * 20,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<think>", "</think>"])
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tok = make_chat_tokenizer()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    words = [tok.encode(w)[0] for w in ("Let", " think", " So", " yes")]
    chain = [ids["<think>"], words[0], words[1], ids["</think>"], words[2], words[3], ids["<|im_end|>"]]
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for dim, (tid, nxt) in enumerate(itertools.pairwise(chain)):
            emb[tid].zero_()
            emb[tid, dim] = 1000.0  # this token's final hidden state points along `dim`
            head[:, dim] = 0.0
            head[nxt, dim] = 10.0  # ... which lm_head reads as "next comes nxt"
    path = tmp_path_factory.mktemp("chat") / "qwen3-chat"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
                     do_sample=False).save_pretrained(path)
    return path, chain


def test_the_chat_directory_is_a_thinking_model(chat_dir):
    path, _ = chat_dir
    _model, tok = mr.load_model(path)
    assert supports_thinking(tok)
    assert think_token_ids(tok) == (tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>"))


@pytest.fixture(scope="module")
def traces(chat_dir):
    path, _ = chat_dir
    model, tok = mr.load_model(path)
    prompts = ["What is two plus two?", "Let me think."]
    thinking = generate_segments(model, tok, prompts, enable_thinking=True, max_new_tokens=12)
    plain = generate_segments(model, tok, prompts, enable_thinking=False, max_new_tokens=12)
    return thinking, plain, tok


def test_segments_follow_the_think_markers(traces, chat_dir):
    thinking, plain, _tok = traces
    _, chain = chat_dir
    for trace, mode in ((thinking, "thinking"), (plain, "non-thinking")):
        assert set(trace.label("mode")) == {mode}
        prompt = trace.label("phase") == "prefill"
        assert (trace.label("segment")[prompt] == "prompt").all()
        assert set(trace.label("segment")[~prompt]) <= {"think", "answer"}
        assert len(np.unique(trace.doc_ids)) == 2
    # thinking: generated inputs are Let, think, </think>, So, yes (im_end ends it and is never fed back)
    for doc in np.unique(thinking.doc_ids):
        sel = (thinking.doc_ids == doc) & (thinking.label("phase") == "decode")
        assert thinking.token_ids[sel].tolist() == chain[1:6]
        assert thinking.label("segment")[sel].tolist() == ["think", "think", "think", "answer", "answer"]
    for doc in np.unique(plain.doc_ids):
        sel = (plain.doc_ids == doc) & (plain.label("phase") == "decode")
        assert plain.token_ids[sel].tolist() == chain[4:6]  # So, yes: after the template's own </think>
        assert plain.label("segment")[sel].tolist() == ["answer", "answer"]


@pytest.mark.filterwarnings("ignore:label .* has values with fewer than 50 tokens")
def test_thinking_contrasts_have_cis_for_each_comparison(traces):
    thinking, plain, _ = traces
    both = combine_modes(thinking, plain)
    counts = segment_counts(both)
    assert counts["tokens"].sum() == both.num_tokens
    assert set(counts["segment"]) == {"prompt", "think", "answer"}
    out = thinking_contrasts(both, n_boot=50)
    assert set(out["comparison"]) == {"think_vs_answer", "thinking_vs_non_thinking", "prefill_vs_decode"}
    assert {"diff", "ci_low", "ci_high", "layer", "expert"} <= set(out.columns)
    assert (out["ci_low"] <= out["ci_high"] + 1e-12).all()
    tv = out[out["comparison"] == "think_vs_answer"]
    think = both.select((both.label("segment") == "think") & (both.label("mode") == "thinking"))
    layer = int(tv["layer"].iloc[0])
    j = both.layers.index(layer)
    share = np.bincount(think.expert_ids[:, j].ravel(), minlength=both.num_experts) / think.expert_ids[:, j].size
    got = tv[tv["layer"] == layer].set_index("expert")["share_a"]
    assert np.allclose(got.sort_index().to_numpy(), share[got.sort_index().index])


def test_segment_labels_of_a_model_that_opens_the_span_itself():
    # original Qwen3 template: the prompt ends "assistant\n" and the model writes <think> itself
    ids = np.array([5, 6, 3, 7, 8, 4, 9, 3, 4])  # prompt 5 6 | <think> 7 8 </think> 9 <think></think>
    is_prompt = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    assert segment_labels(ids, is_prompt, 3, 4).tolist() == [
        "prompt", "prompt", "think", "think", "think", "think", "answer", "think", "think"]


def test_a_tokenizer_without_thinking_is_refused(tokenizer, qwen3_moe):
    with pytest.raises(SettingError, match="no '<think>' token"):
        think_token_ids(tokenizer)
    with pytest.raises(SettingError, match="at least one prompt"):
        generate_segments(qwen3_moe, tokenizer, [])
