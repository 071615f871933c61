"""Shared fixtures: tiny real transformers models and a real (tiny, trained) byte-level BPE tokenizer."""

from __future__ import annotations

import pytest

from moe_routing.testing import tiny_moe, tiny_tokenizer


def make_tokenizer(vocab_size: int = 300):
    """A real byte-level BPE tokenizer trained in milliseconds on a few sentences (no hub access needed)."""
    return tiny_tokenizer(vocab_size)


def make_qwen3_moe(seed: int = 0, *, vocab_size: int = 300, layers: int = 3, experts: int = 8, top_k: int = 2,
                   mlp_only_layers: tuple[int, ...] = (1,)):
    """A tiny random Qwen3MoeForCausalLM (real transformers class), eval mode; layer 1 dense by default."""
    return tiny_moe("qwen3_moe", seed=seed, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                    moe_intermediate_size=16, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, num_experts=experts, num_experts_per_tok=top_k, mlp_only_layers=list(mlp_only_layers),
                    max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def qwen3_moe():
    return make_qwen3_moe()
