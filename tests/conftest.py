"""Shared fixtures: tiny real transformers models and a real (tiny, trained) byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
import torch


def make_tokenizer(vocab_size: int = 300):
    """A real byte-level BPE tokenizer trained in milliseconds on a few sentences (no hub access needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "Der schnelle braune Fuchs springt.",
            "Le renard brun saute par-dessus le chien.", "Быстрая коричневая лиса прыгает.", "敏捷的棕色狐狸跳过了懒狗。"]
    tok.train_from_iterator(text * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_qwen3_moe(seed: int = 0, *, vocab_size: int = 300, layers: int = 3, experts: int = 8, top_k: int = 2,
                   mlp_only_layers: tuple[int, ...] = (1,)):
    """A tiny random Qwen3MoeForCausalLM (real transformers class), eval mode; layer 1 dense by default."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=experts,
        num_experts_per_tok=top_k, mlp_only_layers=list(mlp_only_layers), max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def qwen3_moe():
    return make_qwen3_moe()
