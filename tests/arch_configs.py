"""Tiny configs of every MoE family transformers ships: a data table of ``AutoConfig.for_model`` overrides.

``BASE`` shrinks every size-like attribute that a family's default config has (2-4 layers, hidden 32, 8
experts, top-2, vocab 128); ``ARCHS`` adds the per-family overrides (dense layers, hybrid layer types, group
routing, ...). ``build(arch)`` returns a seeded, eval-mode model of the real transformers class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

VOCAB = 128

# Applied only to attributes the family's default config has (and, for the None-able ones, only when set).
BASE: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "top_k_experts": 2,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "index_topk": 8, "index_head_dim": 16, "index_n_heads": 2,
    "linear_head_dim": 8, "linear_num_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 16, "mamba_dt_rank": 8,
    "ssm_state_size": 8, "mamba_num_heads": 4, "mamba_head_dim": 16, "chunk_size": 16,
    "intermediate_size_mlp": 64, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32,
    "router_hidden_size": 16, "sliding_window": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "shared_intermediate_size": 32, "dense_intermediate_size": 64, "moe_shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "share_expert_dim": 32, "moe_hidden_size": 32,
    "unpadded_vocab_size": VOCAB, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8,
    "o_lora_rank": 8, "o_groups": 2, "hc_lowrank": 8,
    "n_group": 2, "topk_group": 1, "num_expert_group": 2,  # group-limited routing, 4 experts a group
}
NONE_STAYS_NONE = {"q_lora_rank", "unpadded_vocab_size", "sliding_window", "head_dim", "n_group", "topk_group",
                   "num_expert_group"}
UNSET = "<unset>"  # an override value that removes a BASE key (the family derives it itself)


@dataclass(frozen=True)
class Arch:
    """One MoE family: its config model_type, tiny-config overrides and how to build and read it."""

    model_type: str
    overrides: dict[str, Any] = field(default_factory=dict)
    model_class: str | None = None  # transformers class name; default AutoModelForCausalLM
    moe_layers: Callable[[Any], list[int]] | None = None  # the config's rule; default: mlp_layer_types or all
    unsorted_topk: bool = False  # topk(sorted=False): compare slots as sets
    prepare: Callable[[Any], None] | None = None  # adjusts the built model (e.g. a buffer checkpoints learn)
    skip: str | None = None  # why this family cannot be built tiny on CPU here
    generate: bool = False  # representative family for the generate() test
    notes: str = ""


def _every(c) -> list[int]:
    return list(range(c.num_hidden_layers))


def _first_k_dense(c) -> list[int]:
    return list(range(c.first_k_dense_replace, c.num_hidden_layers))


def _sparse_step(c) -> list[int]:
    return [i for i in range(c.num_hidden_layers)
            if i not in (c.mlp_only_layers or []) and (i + 1) % c.decoder_sparse_step == 0]


def _mlp_layer_types(c) -> list[int]:
    return [i for i, t in enumerate(c.mlp_layer_types) if t == "sparse"]


def _zaya_unbias_skip(model) -> None:
    """A fresh ZayaRouter biases its skip class by -1 (it is never chosen); checkpoints learn the bias."""
    for module in model.modules():
        if type(module).__name__ == "ZayaRouter":
            module.balancing_biases[-1] = 0.0


_DS = {"num_hidden_layers": 3, "first_k_dense_replace": 1, "num_key_value_heads": 4, "n_group": 2,
       "topk_group": 1}

ARCH_LIST: list[Arch] = [
    # --- flagships and the generate() representatives
    Arch("qwen3_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]}, moe_layers=_sparse_step, generate=True),
    Arch("deepseek_v3", _DS, moe_layers=_first_k_dense, unsorted_topk=True, generate=True),
    Arch("mixtral", generate=True),
    Arch("gpt_oss", generate=True),
    # --- softmax / linear top-k routers
    Arch("qwen2_moe", {"num_hidden_layers": 3, "decoder_sparse_step": 2}, moe_layers=_sparse_step),
    Arch("qwen3_next", {"num_hidden_layers": 3, "mlp_only_layers": [0],
                        "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
         moe_layers=_sparse_step),
    Arch("qwen3_5_moe_text", {"layer_types": ["linear_attention", "full_attention"]}),
    Arch("qwen3_vl_moe_text", {"num_hidden_layers": 3, "mlp_only_layers": [0]}, model_class="Qwen3VLMoeTextModel",
         moe_layers=_sparse_step),
    Arch("qwen3_omni_moe_text", {"num_hidden_layers": 3, "mlp_only_layers": [0]},
         model_class="Qwen3OmniMoeThinkerTextModel", moe_layers=_sparse_step),
    Arch("qwen4_exp_text", {"layer_types": ["linear_attention", "indexed_attention"], "indexer_n_heads": 2,
                            "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 16,
                            "indexer_compress_ratio": 4}),
    Arch("minimax"),
    Arch("minimax_m2"),
    Arch("minimax_m3_vl_text"),
    Arch("olmoe"),
    Arch("flex_olmo"),
    Arch("jamba", {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 0,
                   "expert_layer_period": 2, "expert_layer_offset": 1, "use_mamba_kernels": False},
         moe_layers=lambda c: [i for i in range(c.num_hidden_layers)
                               if i % c.expert_layer_period == c.expert_layer_offset]),
    Arch("hunyuan_v1_moe", {"head_dim": 8, "moe_topk": [2, 1]},
         notes="per-layer top-k (layer 1 routes 1 expert: its second slot is -1). A per-layer num_experts list is "
               "refused by the config's type check and HunYuanMoEV1Experts reads it as an int in 5.24"),
    Arch("granitemoe"),
    Arch("granitemoeshared", {"shared_intermediate_size": 32}),
    Arch("granitemoe_swa"),
    Arch("granitemoehybrid", {"layer_types": ["linear_attention", "attention"]}),
    Arch("phimoe"),
    Arch("dbrx", {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 128, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                  "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}}),
    Arch("aria_text"),
    Arch("cohere2_moe"),
    Arch("flint", {"num_hidden_layers": 3, "mlp_only_layers": [0]}, moe_layers=_sparse_step),
    Arch("kolibri1"),
    Arch("laguna"),
    Arch("lara_mini", {"layer_types": ["linear_attention", "full_attention"]}),
    Arch("mellum"),
    Arch("beam", unsorted_topk=True),
    Arch("step3p5", {"sliding_window": 16}, model_class="Step3p7TextModel"),
    Arch("muse_spark_text", model_class="MuseSparkTextModel"),
    Arch("openai_privacy_filter", model_class="OpenAIPrivacyFilterForTokenClassification"),
    Arch("inkling_text"),
    Arch("inkling2_text"),
    Arch("inkling2_loop_text"),
    # --- DeepSeek-style routers (sigmoid + bias, group-limited, topk(sorted=False))
    Arch("deepseek_v2", {**_DS, "n_group": None, "topk_group": None}, moe_layers=_first_k_dense, unsorted_topk=True),
    Arch("deepseek_v32", {"num_key_value_heads": 4, "n_group": 2, "topk_group": 1}, unsorted_topk=True),
    Arch("deepseek_v4", {"mlp_layer_types": ["hash_moe", "moe", "moe"]}, moe_layers=_every, unsorted_topk=True),
    Arch("deepseek_ocr2_text", model_class="DeepseekOcr2TextModel", unsorted_topk=True),
    Arch("glm4_moe", {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1},
         moe_layers=_first_k_dense, unsorted_topk=True),
    Arch("glm4_moe_lite", {"num_key_value_heads": 4, "n_group": 2, "topk_group": 1}, unsorted_topk=True),
    Arch("glm4v_moe_text", {"num_hidden_layers": 3, "first_k_dense_replace": 1, "head_dim": 16,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}}, model_class="Glm4vMoeTextModel",
         moe_layers=_first_k_dense, unsorted_topk=True),
    Arch("glm_moe_dsa", {"num_key_value_heads": 4}, unsorted_topk=True),
    Arch("glm5_next_text", {"num_key_value_heads": 4, "index_kpool": 4, "qk_rope_head_dim": UNSET, "head_dim": UNSET,
                               "layer_types": ["linear_attention", "full_attention", "linear_attention"]}, model_class="Glm5NextTextModel",
         unsorted_topk=True),
    Arch("dots1", {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1},
         moe_layers=_first_k_dense, unsorted_topk=True),
    Arch("dots3_note_text", {"num_key_value_heads": 4, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4,
                             "swa_q_lora_rank": 16, "swa_kv_lora_rank": 16, "swa_head_dim": 16,
                             "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 8}, unsorted_topk=True),
    Arch("kimi_linear", {"num_key_value_heads": 4,
                         "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
         unsorted_topk=True),
    Arch("bailing_hybrid", {"num_key_value_heads": 4,
                            "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
         unsorted_topk=True),
    Arch("exaone_moe", unsorted_topk=True),
    Arch("solar_open", unsorted_topk=True),
    Arch("mimo_v2_flash", unsorted_topk=True),
    Arch("mistral4", {**_DS, "head_dim": UNSET}, model_class="Mistral4ForCausalLM", moe_layers=_first_k_dense, unsorted_topk=True),
    Arch("mistral_large4_text", {"num_key_value_heads": 4}, model_class="MistralLarge4TextModel",
         unsorted_topk=True),
    Arch("axk1", {"num_key_value_heads": 4}, unsorted_topk=True),
    Arch("axk2", {"num_key_value_heads": 4}, unsorted_topk=True),
    Arch("hy_v4", unsorted_topk=True),
    Arch("hy_v4_vl_text", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": [2, 1, 1]}},
         model_class="HYV4VLTextModel", unsorted_topk=True),
    Arch("unlimited_ocr_text", model_class="UnlimitedOcrTextModel", unsorted_topk=True),
    Arch("longcat_flash", {"num_layers": 2, "num_key_value_heads": 4, "zero_expert_num": 2},
         moe_layers=lambda c: list(range(c.num_layers)),
         unsorted_topk=True),
    Arch("nemotron_h", {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"],
                        "n_groups": 1, "use_mamba_kernels": False},
         moe_layers=lambda c: [i for i, t in enumerate(c.layers_block_type) if t == "moe"], unsorted_topk=True),
    # --- biased routers with the bias on the block
    Arch("ernie4_5_moe", {"num_hidden_layers": 3, "moe_layer_start_index": 1, "moe_layer_end_index": 2},
         moe_layers=lambda c: list(range(c.moe_layer_start_index, c.moe_layer_end_index + 1,
                                         c.moe_layer_interval))),
    Arch("ernie4_5_vl_moe_text", {"moe_intermediate_size": [32, 32],
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [1, 1, 2]}}, model_class="Ernie4_5_VLMoeTextModel"),
    Arch("afmoe", {"num_hidden_layers": 3, "num_dense_layers": 1},
         moe_layers=lambda c: list(range(c.num_dense_layers, c.num_hidden_layers))),
    Arch("hy_v3"),
    Arch("lfm2_moe", {"num_hidden_layers": 3, "num_dense_layers": 1,
                      "layer_types": ["conv", "full_attention", "conv"]},
         moe_layers=lambda c: list(range(c.num_dense_layers, c.num_hidden_layers))),
    # --- special readings
    Arch("llama4_text", {"num_hidden_layers": 4, "interleave_moe_layer_step": 2}, moe_layers=lambda c: c.moe_layers),
    Arch("gemma4_text", {"enable_moe_block": True, "global_head_dim": 8, "hidden_size_per_layer_input": 8,
                         "vocab_size_per_layer_input": VOCAB}),
    Arch("diffusion_gemma_text", {"num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32,
                                  "global_head_dim": 8}, model_class="DiffusionGemmaEncoderTextModel"),
    Arch("zaya", {"num_experts_per_tok": 1}, prepare=_zaya_unbias_skip,
         notes="top-1 only (the config refuses more); the skip class is unbiased so some tokens skip"),
    Arch("switch_transformers", {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 4, "num_decoder_layers": 2,
                                 "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 1, "num_heads": 4,
                                 "expert_capacity": 1, "router_jitter_noise": 0.0, "dropout_rate": 0.0},
         model_class="SwitchTransformersForConditionalGeneration",
         moe_layers=lambda c: [i for i in range(c.num_layers)
                               if c.encoder_sparse_step == 1 or i % c.encoder_sparse_step == 1],
         notes="encoder stack captured; expert_capacity=1 so tokens are dropped"),
    Arch("nllb-moe", {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 64,
                      "decoder_ffn_dim": 64, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                      "encoder_sparse_step": 2, "decoder_sparse_step": 2, "encoder_layerdrop": 0.0,
                      "decoder_layerdrop": 0.0, "moe_token_dropout": 0.0},
         model_class="NllbMoeModel",
         skip="transformers 5.24 NllbMoeExperts one-hot encodes the router's already one-hot top_1_mask, so only "
              "expert_0 and expert_1 ever run whatever the router chose: no reading of the routing is faithful"),
    Arch("jetmoe", {"kv_channels": 8}),
    Arch("doge", {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 2}),
]

ARCHS: dict[str, Arch] = {a.model_type: a for a in ARCH_LIST}


def tiny_config(arch: Arch):
    from transformers import AutoConfig

    default = AutoConfig.for_model(arch.model_type).to_dict()
    kwargs = {}
    for key, value in BASE.items():
        if key not in default or (key in NONE_STAYS_NONE and default[key] is None):
            continue
        kwargs[key] = value
    if "mlp_layer_types" in default:  # families that list dense/sparse per layer: one dense layer first
        kwargs["num_hidden_layers"] = 3
        kwargs["mlp_layer_types"] = ["dense", "sparse", "sparse"]
    kwargs.update(arch.overrides)
    kwargs = {k: v for k, v in kwargs.items() if v != UNSET}
    return AutoConfig.for_model(arch.model_type, **kwargs)


def model_class(arch: Arch):
    import transformers
    from transformers import AutoModelForCausalLM

    if arch.model_class:
        return getattr(transformers, arch.model_class)
    return AutoModelForCausalLM


def build(arch: Arch, seed: int = 0):
    """A tiny random model of ``arch`` (real transformers class), float32, eval mode."""
    cfg = tiny_config(arch)
    torch.manual_seed(seed)
    cls = model_class(arch)
    model = cls.from_config(cfg) if hasattr(cls, "from_config") else cls._from_config(cfg)
    model = model.float().eval()
    if arch.prepare:
        arch.prepare(model)
    return model


_E_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_K_ATTRS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts")


def expected_num_experts(arch: Arch, config) -> int:
    """Routed ids a router can emit, from the config (longcat adds its zero-experts, dbrx nests its ffn_config)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    if arch.model_type == "dbrx":
        return c.ffn_config.moe_num_experts
    n = next(getattr(c, a) for a in _E_ATTRS if isinstance(getattr(c, a, None), int))
    return n + (c.zero_expert_num or 0) if arch.model_type == "longcat_flash" else n


def expected_top_k(arch: Arch, config) -> int:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    if arch.model_type == "dbrx":
        return c.ffn_config.moe_top_k
    if arch.model_type == "switch_transformers":
        return 1
    k = next(getattr(c, a) for a in _K_ATTRS if getattr(c, a, None))
    return max(k) if isinstance(k, list) else k


def expected_moe_layers(arch: Arch, config) -> list[int]:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    rule = arch.moe_layers or (_mlp_layer_types if getattr(c, "mlp_layer_types", None) else _every)
    return rule(c)

