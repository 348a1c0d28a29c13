"""Built-in catalog of common architectures.

Each entry holds the fields dsplan reads from the model's public ``config.json``
on the Hugging Face hub (copied by hand; no weights, no hub access at run time),
plus the LLaMA-Factory 0.9.5 chat template that fits it (LF's
``extras/constants.py`` pairs each model with its template).  Instruct/Chat
variants share their base model's shapes, so ``Qwen2.5-7B-Instruct`` resolves to
``Qwen2.5-7B``; :func:`hub_id` gives the hub id of the variant that was named.

Where a family's config.json could not be read from a public copy, the family is
left out rather than guessed (see ``tests/test_catalog.py`` for every entry's
parameter count against its model card).
"""

from __future__ import annotations


def _cfg(model_type, hidden, inter, layers, heads, kv, vocab, tie, qkv_bias, **extra):
    """The config.json fields dsplan reads (positions and RoPE do not change memory at a given cutoff)."""
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "attention_bias": qkv_bias,  # q/k/v projections carry a bias (Qwen1.5/Qwen2/2.5)
        **extra,
    }


def _qwen3_moe(hidden, inter, moe_inter, layers, heads, kv, experts, top_k):
    """Qwen3-MoE: every layer an MoE layer (decoder_sparse_step 1, no mlp_only_layers), no shared expert."""
    return {"model_type": "qwen3_moe", "hidden_size": hidden, "intermediate_size": inter,
            "moe_intermediate_size": moe_inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": 128, "num_experts": experts, "num_experts_per_tok": top_k,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936, "tie_word_embeddings": False,
            "attention_bias": False}


# ---- shapes shared by several entries (a release and its re-releases) ---------------
_QWEN3_4B = _cfg("qwen3", 2560, 9728, 36, 32, 8, 151936, True, False, head_dim=128)
_QWEN3_8B = _cfg("qwen3", 4096, 12288, 36, 32, 8, 151936, False, False, head_dim=128)
_QWEN3_30B_A3B = _qwen3_moe(2048, 6144, 768, 48, 32, 4, 128, 8)
_QWEN3_235B_A22B = _qwen3_moe(4096, 12288, 1536, 94, 64, 4, 128, 8)
_LLAMA31_8B = _cfg("llama", 4096, 14336, 32, 32, 8, 128256, False, False)
_LLAMA33_70B = _cfg("llama", 8192, 28672, 80, 64, 8, 128256, False, False, head_dim=128)
#: DeepSeek-V3 (and R1, same architecture): MLA, 256 routed + 1 shared expert, first 3 layers dense.
_DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "vocab_size": 129280,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "tie_word_embeddings": False, "attention_bias": False,
}
#: Gemma 3's SigLIP encoder (the same 400M tower in the 4B, 12B and 27B models).
_GEMMA3_VISION = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
                  "vision_use_head": False}


def _gemma3(hidden, inter, layers, heads, kv, head_dim):
    """A Gemma 3 VLM: config.json names only a few text keys; vocab_size is transformers' default."""
    return {"model_type": "gemma3", "mm_tokens_per_image": 256,
            "text_config": {"model_type": "gemma3_text", "hidden_size": hidden, "intermediate_size": inter,
                            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                            "head_dim": head_dim, "vocab_size": 262208},
            "vision_config": _GEMMA3_VISION}


def _qwen3_vl(text: dict, depth, vis_hidden, vis_inter, deepstack):
    """A Qwen3-VL: the text model's config under text_config, a 16-pixel-patch vision tower."""
    return {"model_type": "qwen3_vl_moe" if "num_experts" in text else "qwen3_vl",
            "tie_word_embeddings": text["tie_word_embeddings"], "text_config": text,
            "vision_config": {"depth": depth, "hidden_size": vis_hidden, "intermediate_size": vis_inter,
                              "num_heads": 16, "out_hidden_size": text["hidden_size"], "patch_size": 16,
                              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                              "num_position_embeddings": 2304, "deepstack_visual_indexes": deepstack}}


def _qwen25_vl(text: dict):
    """A Qwen2.5-VL: the text sizes at the top level, a 14-pixel-patch windowed vision tower."""
    return {**text, "model_type": "qwen2_5_vl",
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "out_hidden_size": text["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
                              "temporal_patch_size": 2, "in_channels": 3}}


def _entry(hf_id, template, config, instruct=None, base=None):
    e = {"hf_id": hf_id, "template": template, "config": config}
    if instruct:
        e["instruct"] = instruct  # the hub id of the -Instruct/-Chat/-it variant, where not hf_id + suffix
    if base:
        e["base"] = base  # the hub id of the -Base variant, where hf_id is the post-trained model
    return e


#: name -> {"hf_id", "template", "config"[, "instruct", "base"]}.  Source for every row: the
#: config.json of the hub repository named in hf_id (as published; the fields dsplan reads,
#: copied verbatim), read from public copies: mlc-ai/mlc-llm python/mlc_llm/model/model_preset.py
#: (Llama 2, Llama 3.2, Qwen2, Qwen1.5-MoE, Mistral, Mixtral, Gemma 2, Gemma 3 1B, Phi-3.5-mini,
#: Phi-4-mini, InternLM2.5, DeepSeek-V2-Lite, deepseek-moe-16b); citsjtu2020/LLM-Prof
#: sglang/Model_Config.md (Qwen3 4B-32B, Qwen3-30B-A3B); AI-Hypercomputer/maxtext
#: src/MaxText/configs/models/ (Gemma 3 4B/12B/27B, Llama 3.3 70B, Qwen3-VL-4B text);
#: THUDM/slime scripts/models/ (Qwen3-VL-30B-A3B text); zhenhua32/Qwen2-VL READ.md (Qwen2-VL-7B's
#: module shapes); and config.json files quoted verbatim in public code (Qwen3-235B-A22B,
#: Qwen2.5-VL-3B/7B, Qwen3-VL-4B/8B/30B-A3B vision, Llama-4-Scout, DeepSeek-V3/R1, GLM-4-9B,
#: Phi-4, Yi-6B).  Every count equals what transformers 5.6 builds from the same config
#: (tests/test_catalog.py, marked real).  Left out: Baichuan2 (no LF 0.9.5 template), Qwen3.5
#: (gated DeltaNet layers dsplan does not model), Llama 3.2 Vision (cross-attention layers not
#: modelled), and sizes whose config.json was not found in a public copy (Qwen2-VL-2B, Phi-3
#: medium, Yi 9B/34B, InternLM2.5 1.8B/20B, GLM-4-32B).
CATALOG: dict[str, dict] = {
    # Qwen2.5 family (Qwen/Qwen2.5-*): 0.5B-3B tie the embeddings, 7B+ do not and pad vocab to 152064.
    "Qwen2.5-0.5B": {"hf_id": "Qwen/Qwen2.5-0.5B", "template": "qwen",
                     "config": _cfg("qwen2", 896, 4864, 24, 14, 2, 151936, True, True)},
    "Qwen2.5-1.5B": {"hf_id": "Qwen/Qwen2.5-1.5B", "template": "qwen",
                     "config": _cfg("qwen2", 1536, 8960, 28, 12, 2, 151936, True, True)},
    "Qwen2.5-3B": {"hf_id": "Qwen/Qwen2.5-3B", "template": "qwen",
                   "config": _cfg("qwen2", 2048, 11008, 36, 16, 2, 151936, True, True)},
    "Qwen2.5-7B": {"hf_id": "Qwen/Qwen2.5-7B", "template": "qwen",
                   "config": _cfg("qwen2", 3584, 18944, 28, 28, 4, 152064, False, True)},
    "Qwen2.5-14B": {"hf_id": "Qwen/Qwen2.5-14B", "template": "qwen",
                    "config": _cfg("qwen2", 5120, 13824, 48, 40, 8, 152064, False, True)},
    "Qwen2.5-32B": {"hf_id": "Qwen/Qwen2.5-32B", "template": "qwen",
                    "config": _cfg("qwen2", 5120, 27648, 64, 40, 8, 152064, False, True)},
    "Qwen2.5-72B": {"hf_id": "Qwen/Qwen2.5-72B", "template": "qwen",
                    "config": _cfg("qwen2", 8192, 29568, 80, 64, 8, 152064, False, True)},
    # Qwen1.5 (seed 002): multi-head attention (kv = heads), vocab 151936.
    "Qwen1.5-7B": {"hf_id": "Qwen/Qwen1.5-7B", "template": "qwen",
                   "config": _cfg("qwen2", 4096, 11008, 32, 32, 32, 151936, False, True)},
    # Qwen2: LF's own examples fine-tune Qwen2-1.5B-Instruct.
    "Qwen2-0.5B": _entry("Qwen/Qwen2-0.5B", "qwen", _cfg("qwen2", 896, 4864, 24, 14, 2, 151936, True, True)),
    "Qwen2-1.5B": _entry("Qwen/Qwen2-1.5B", "qwen", _cfg("qwen2", 1536, 8960, 28, 12, 2, 151936, True, True)),
    # Qwen1.5-MoE: 60 routed experts (top 4) plus one gated shared expert of 5632.
    "Qwen1.5-MoE-A2.7B": _entry("Qwen/Qwen1.5-MoE-A2.7B", "qwen", {
        "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 1,
        "vocab_size": 151936, "tie_word_embeddings": False}),
    # Qwen3 (Qwen/Qwen3-*): head_dim 128 and per-head q/k norms; 0.6B-4B tie the embeddings.
    "Qwen3-0.6B": _entry("Qwen/Qwen3-0.6B", "qwen3",
                         _cfg("qwen3", 1024, 3072, 28, 16, 8, 151936, True, False, head_dim=128),
                         base="Qwen/Qwen3-0.6B-Base"),
    "Qwen3-1.7B": _entry("Qwen/Qwen3-1.7B", "qwen3",
                         _cfg("qwen3", 2048, 6144, 28, 16, 8, 151936, True, False, head_dim=128),
                         base="Qwen/Qwen3-1.7B-Base"),
    "Qwen3-4B": _entry("Qwen/Qwen3-4B", "qwen3", _QWEN3_4B, base="Qwen/Qwen3-4B-Base"),
    "Qwen3-4B-Instruct-2507": _entry("Qwen/Qwen3-4B-Instruct-2507", "qwen3_nothink", _QWEN3_4B),
    "Qwen3-4B-Thinking-2507": _entry("Qwen/Qwen3-4B-Thinking-2507", "qwen3", _QWEN3_4B),
    "Qwen3-8B": _entry("Qwen/Qwen3-8B", "qwen3", _QWEN3_8B, base="Qwen/Qwen3-8B-Base"),
    "Qwen3-14B": _entry("Qwen/Qwen3-14B", "qwen3",
                         _cfg("qwen3", 5120, 17408, 40, 40, 8, 151936, False, False, head_dim=128),
                         base="Qwen/Qwen3-14B-Base"),
    "Qwen3-32B": _entry("Qwen/Qwen3-32B", "qwen3", _cfg("qwen3", 5120, 25600, 64, 64, 8, 151936, False, False,
                                                         head_dim=128)),
    "Qwen3-30B-A3B": _entry("Qwen/Qwen3-30B-A3B", "qwen3", _QWEN3_30B_A3B,
                           base="Qwen/Qwen3-30B-A3B-Base"),
    "Qwen3-30B-A3B-Instruct-2507": _entry("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3_nothink", _QWEN3_30B_A3B),
    "Qwen3-30B-A3B-Thinking-2507": _entry("Qwen/Qwen3-30B-A3B-Thinking-2507", "qwen3", _QWEN3_30B_A3B),
    "Qwen3-235B-A22B": _entry("Qwen/Qwen3-235B-A22B", "qwen3", _QWEN3_235B_A22B),
    "Qwen3-235B-A22B-Instruct-2507": _entry("Qwen/Qwen3-235B-A22B-Instruct-2507", "qwen3_nothink",
                                            _QWEN3_235B_A22B),
    "Qwen3-235B-A22B-Thinking-2507": _entry("Qwen/Qwen3-235B-A22B-Thinking-2507", "qwen3", _QWEN3_235B_A22B),
    # Qwen2-VL-7B (Qwen/Qwen2-VL-7B-Instruct): Qwen2-7B text sizes at the top level, a LayerNorm ViT.
    "Qwen2-VL-7B": _entry("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", {
        **_cfg("qwen2", 3584, 18944, 28, 28, 4, 152064, False, True), "model_type": "qwen2_vl",
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}),
    # Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct): Qwen2.5 text models under a 32-block vision tower.
    "Qwen2.5-VL-3B": _entry("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_vl", _qwen25_vl(
        _cfg("qwen2", 2048, 11008, 36, 16, 2, 151936, True, True))),
    "Qwen2.5-VL-7B": _entry("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_vl", _qwen25_vl(
        _cfg("qwen2", 3584, 18944, 28, 28, 4, 152064, False, True))),
    # Qwen3-VL (Qwen/Qwen3-VL-*): Qwen3 text models, deepstack mergers from three vision blocks.
    "Qwen3-VL-4B": _entry("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl_nothink", _qwen3_vl(
        _QWEN3_4B, 24, 1024, 4096, [5, 11, 17])),
    "Qwen3-VL-4B-Thinking": _entry("Qwen/Qwen3-VL-4B-Thinking", "qwen3_vl", _qwen3_vl(
        _QWEN3_4B, 24, 1024, 4096, [5, 11, 17])),
    "Qwen3-VL-8B": _entry("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl_nothink", _qwen3_vl(
        _QWEN3_8B, 27, 1152, 4304, [8, 16, 24])),
    "Qwen3-VL-8B-Thinking": _entry("Qwen/Qwen3-VL-8B-Thinking", "qwen3_vl", _qwen3_vl(
        _QWEN3_8B, 27, 1152, 4304, [8, 16, 24])),
    "Qwen3-VL-30B-A3B": _entry("Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3_vl_nothink", _qwen3_vl(
        _QWEN3_30B_A3B, 27, 1152, 4304, [8, 16, 24])),
    "Qwen3-VL-30B-A3B-Thinking": _entry("Qwen/Qwen3-VL-30B-A3B-Thinking", "qwen3_vl", _qwen3_vl(
        _QWEN3_30B_A3B, 27, 1152, 4304, [8, 16, 24])),
    # Llama 2 (meta-llama/Llama-2-*-hf): vocab 32000; 7B/13B multi-head, 70B GQA.
    "Llama-2-7B": _entry("meta-llama/Llama-2-7b-hf", "llama2", _cfg("llama", 4096, 11008, 32, 32, 32, 32000,
                                                                    False, False), "meta-llama/Llama-2-7b-chat-hf"),
    "Llama-2-13B": _entry("meta-llama/Llama-2-13b-hf", "llama2", _cfg("llama", 5120, 13824, 40, 40, 40, 32000,
                                                                      False, False),
                          "meta-llama/Llama-2-13b-chat-hf"),
    "Llama-2-70B": _entry("meta-llama/Llama-2-70b-hf", "llama2", _cfg("llama", 8192, 28672, 80, 64, 8, 32000,
                                                                      False, False),
                          "meta-llama/Llama-2-70b-chat-hf"),
    # Llama 3 / 3.1 (meta-llama/*): GQA with 8 kv heads, vocab 128256.
    "Llama-3-8B": {"hf_id": "meta-llama/Meta-Llama-3-8B", "template": "llama3",
                   "config": _cfg("llama", 4096, 14336, 32, 32, 8, 128256, False, False)},
    "Llama-3-70B": {"hf_id": "meta-llama/Meta-Llama-3-70B", "template": "llama3",
                    "config": _cfg("llama", 8192, 28672, 80, 64, 8, 128256, False, False)},
    "Llama-3.1-8B": {"hf_id": "meta-llama/Llama-3.1-8B", "template": "llama3",
                     "config": _cfg("llama", 4096, 14336, 32, 32, 8, 128256, False, False)},
    "Llama-3.1-70B": {"hf_id": "meta-llama/Llama-3.1-70B", "template": "llama3",
                      "config": _cfg("llama", 8192, 28672, 80, 64, 8, 128256, False, False)},
    # Llama 3.2 (meta-llama/Llama-3.2-*): tied embeddings.  Llama 3.3 ships as Instruct only.
    "Llama-3.2-1B": _entry("meta-llama/Llama-3.2-1B", "llama3", _cfg("llama", 2048, 8192, 16, 32, 8, 128256, True,
                                                                     False, head_dim=64)),
    "Llama-3.2-3B": _entry("meta-llama/Llama-3.2-3B", "llama3", _cfg("llama", 3072, 8192, 28, 24, 8, 128256, True,
                                                                     False, head_dim=128)),
    "Llama-3.3-70B": _entry("meta-llama/Llama-3.3-70B-Instruct", "llama3", _LLAMA33_70B),
    # Llama 4 Scout: 16 routed experts (top 1) + one shared expert in all 48 layers; a 34-block ViT.
    "Llama-4-Scout-17B-16E": _entry("meta-llama/Llama-4-Scout-17B-16E", "llama4", {
        "model_type": "llama4", "tie_word_embeddings": False,
        "text_config": {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
                        "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
                        "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 16,
                        "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "vocab_size": 202048,
                        "attention_bias": False},
        "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408, "intermediate_size": 5632,
                          "num_hidden_layers": 34, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                          "num_channels": 3, "projector_input_dim": 4096, "projector_output_dim": 4096,
                          "vision_output_dim": 4096, "pixel_shuffle_ratio": 0.5}}),
    # DeepSeek-R1 distills are Qwen2.5(-Math) and Llama 3.1/3.3 shapes with untied embeddings.
    "DeepSeek-R1-Distill-Qwen-1.5B": {"hf_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "template": "deepseekr1",
                                      "config": _cfg("qwen2", 1536, 8960, 28, 12, 2, 151936, False, True)},
    "DeepSeek-R1-Distill-Qwen-7B": {"hf_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "template": "deepseekr1",
                                    "config": _cfg("qwen2", 3584, 18944, 28, 28, 4, 152064, False, True)},
    "DeepSeek-R1-Distill-Qwen-14B": {"hf_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "template": "deepseekr1",
                                     "config": _cfg("qwen2", 5120, 13824, 48, 40, 8, 152064, False, True)},
    "DeepSeek-R1-Distill-Qwen-32B": {"hf_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "template": "deepseekr1",
                                     "config": _cfg("qwen2", 5120, 27648, 64, 40, 8, 152064, False, True)},
    "DeepSeek-R1-Distill-Llama-8B": _entry("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseekr1", _LLAMA31_8B),
    "DeepSeek-R1-Distill-Llama-70B": _entry("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "deepseekr1",
                                            _LLAMA33_70B),
    # DeepSeek MoE.  deepseek-moe-16b is remote code (one nn.Linear per expert); V2-Lite has MLA
    # without a q low-rank; V3/R1 have MLA, 256 experts and 3 dense layers.
    "deepseek-moe-16b": _entry("deepseek-ai/deepseek-moe-16b-base", "deepseek", {
        "model_type": "deepseek", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 102400,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "tie_word_embeddings": False, "attention_bias": False},
        "deepseek-ai/deepseek-moe-16b-chat"),
    "DeepSeek-V2-Lite": _entry("deepseek-ai/DeepSeek-V2-Lite", "deepseek", {
        "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 102400,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "tie_word_embeddings": False, "attention_bias": False},
        "deepseek-ai/DeepSeek-V2-Lite-Chat"),
    "DeepSeek-V3": _entry("deepseek-ai/DeepSeek-V3", "deepseek3", _DEEPSEEK_V3),
    "DeepSeek-V3-0324": _entry("deepseek-ai/DeepSeek-V3-0324", "deepseek3", _DEEPSEEK_V3),
    "DeepSeek-R1": _entry("deepseek-ai/DeepSeek-R1", "deepseekr1", _DEEPSEEK_V3),
    # Mistral (mistralai/*): v0.1 has a 32000 vocab, v0.3 extends it to 32768.
    "Mistral-7B-v0.1": {"hf_id": "mistralai/Mistral-7B-v0.1", "template": "mistral",
                        "config": _cfg("mistral", 4096, 14336, 32, 32, 8, 32000, False, False),
                        "instruct": "mistralai/Mistral-7B-Instruct-v0.1"},
    "Mistral-7B-v0.3": {"hf_id": "mistralai/Mistral-7B-v0.3", "template": "mistral",
                        "config": _cfg("mistral", 4096, 14336, 32, 32, 8, 32768, False, False),
                        "instruct": "mistralai/Mistral-7B-Instruct-v0.3"},
    # Mixtral: 8 experts of Mistral-7B's MLP width, top 2, in every layer.
    "Mixtral-8x7B-v0.1": _entry("mistralai/Mixtral-8x7B-v0.1", "mistral", _cfg(
        "mixtral", 4096, 14336, 32, 32, 8, 32000, False, False, num_local_experts=8, num_experts_per_tok=2),
        "mistralai/Mixtral-8x7B-Instruct-v0.1"),
    # Gemma 2 (google/gemma-2-*): four norms per layer, tied embeddings, vocab 256000.
    "gemma-2-2b": _entry("google/gemma-2-2b", "gemma2", _cfg("gemma2", 2304, 9216, 26, 8, 4, 256000, True, False,
                                                             head_dim=256)),
    "gemma-2-9b": _entry("google/gemma-2-9b", "gemma2", _cfg("gemma2", 3584, 14336, 42, 16, 8, 256000, True, False,
                                                             head_dim=256)),
    "gemma-2-27b": _entry("google/gemma-2-27b", "gemma2", _cfg("gemma2", 4608, 36864, 46, 32, 16, 256000, True,
                                                               False, head_dim=128)),
    # Gemma 3: 1B is text only (LF pairs it with the gemma2 template); 4B-27B add a SigLIP tower.
    "gemma-3-1b": _entry("google/gemma-3-1b-pt", "gemma2", _cfg("gemma3_text", 1152, 6912, 26, 4, 1, 262144, True,
                                                                False, head_dim=256), "google/gemma-3-1b-it"),
    "gemma-3-4b": _entry("google/gemma-3-4b-pt", "gemma3", _gemma3(2560, 10240, 34, 8, 4, 256),
                         "google/gemma-3-4b-it"),
    "gemma-3-12b": _entry("google/gemma-3-12b-pt", "gemma3", _gemma3(3840, 15360, 48, 16, 8, 256),
                          "google/gemma-3-12b-it"),
    "gemma-3-27b": _entry("google/gemma-3-27b-pt", "gemma3", _gemma3(5376, 21504, 62, 32, 16, 128),
                          "google/gemma-3-27b-it"),
    # Phi (microsoft/*): fused qkv_proj and gate_up_proj.
    "Phi-3.5-mini": _entry("microsoft/Phi-3.5-mini-instruct", "phi", _cfg("phi3", 3072, 8192, 32, 32, 32, 32064,
                                                                          False, False)),
    "Phi-4-mini": _entry("microsoft/Phi-4-mini-instruct", "phi4_mini", _cfg("phi3", 3072, 8192, 32, 24, 8, 200064,
                                                                            True, False)),
    "phi-4": _entry("microsoft/phi-4", "phi4", _cfg("phi3", 5120, 17920, 40, 40, 10, 100352, False, False)),
    # GLM-4-9B (zai-org, formerly THUDM): remote code with ChatGLM's key names, fused query_key_value.
    "glm-4-9b": _entry("zai-org/glm-4-9b", "glm4", {
        "model_type": "chatglm", "hidden_size": 4096, "ffn_hidden_size": 13696, "num_layers": 40,
        "num_attention_heads": 32, "multi_query_group_num": 2, "kv_channels": 128, "padded_vocab_size": 151552,
        "add_qkv_bias": True, "add_bias_linear": False, "tie_word_embeddings": False}, "zai-org/glm-4-9b-chat"),
    # Yi (01-ai/*): Llama layout, GQA with 4 kv heads, vocab 64000; Yi-1.5 continues Yi's pre-training.
    "Yi-6B": _entry("01-ai/Yi-6B", "yi", _cfg("llama", 4096, 11008, 32, 32, 4, 64000, False, False),
                    "01-ai/Yi-6B-Chat"),
    "Yi-1.5-6B": _entry("01-ai/Yi-1.5-6B", "yi", _cfg("llama", 4096, 11008, 32, 32, 4, 64000, False, False),
                        "01-ai/Yi-1.5-6B-Chat"),
    # InternLM2.5 (internlm/internlm2_5-7b): remote code, fused wqkv.
    "internlm2_5-7b": _entry("internlm/internlm2_5-7b", "intern2", _cfg("internlm2", 4096, 14336, 32, 32, 8, 92544,
                                                                        False, False), "internlm/internlm2_5-7b-chat"),
}

#: Short names people type.
CATALOG_ALIASES = {
    "Mistral-7B": "Mistral-7B-v0.1",
    "Meta-Llama-3-8B": "Llama-3-8B",
    "Meta-Llama-3-70B": "Llama-3-70B",
    "Meta-Llama-3.1-8B": "Llama-3.1-8B",
    "Meta-Llama-3.1-70B": "Llama-3.1-70B",
    "Llama-2-7b-hf": "Llama-2-7B",
    "Llama-2-13b-hf": "Llama-2-13B",
    "Llama-2-70b-hf": "Llama-2-70B",
    "Qwen3-VL-4B-Instruct": "Qwen3-VL-4B",
    "Qwen3-VL-8B-Instruct": "Qwen3-VL-8B",
    "Qwen3-VL-30B-A3B-Instruct": "Qwen3-VL-30B-A3B",
    "Qwen2-VL-7B-Instruct": "Qwen2-VL-7B",
    "glm-4-9b-chat": "glm-4-9b",
    "Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL-3B",
    "Qwen2.5-VL-7B-Instruct": "Qwen2.5-VL-7B",
    "Mixtral-8x7B": "Mixtral-8x7B-v0.1",
    "deepseek-moe-16b-base": "deepseek-moe-16b",
    "DeepSeek-V3-Base": "DeepSeek-V3",
    "DeepSeek-V3-0324-BF16": "DeepSeek-V3-0324",
    "gemma-3-1b-pt": "gemma-3-1b",
    "gemma-3-4b-pt": "gemma-3-4b",
    "gemma-3-12b-pt": "gemma-3-12b",
    "gemma-3-27b-pt": "gemma-3-27b",
    "Phi-3.5-mini-instruct": "Phi-3.5-mini",
    "Phi-4-mini-instruct": "Phi-4-mini",
    "Llama-3.3-70B-Instruct": "Llama-3.3-70B",
}

#: Variant suffixes stripped before the lookup, with the casing their hub ids use.
_VARIANT_SUFFIXES = {"-instruct": "-Instruct", "-chat": "-Chat", "-it": "-it", "-base": "-Base"}


def _split(name: str) -> tuple[str, str]:
    """(the catalog key to look up, the variant suffix stripped from it, lower-case)."""
    key = name.strip().rstrip("/").split("/")[-1]
    for suffix in _VARIANT_SUFFIXES:
        if key.lower().endswith(suffix) and key.lower() not in _lowered():
            return key[: -len(suffix)], suffix
    return key, ""


def _lowered() -> dict[str, str]:
    lowered = {k.lower(): k for k in CATALOG}
    lowered.update({a.lower(): t for a, t in CATALOG_ALIASES.items()})
    return lowered


def lookup(name: str) -> tuple[str, dict] | None:
    """Find a catalog entry by name, hub id, or instruct/chat variant; case-insensitive."""
    key, _ = _split(name)
    canon = _lowered().get(key.lower())
    return (canon, CATALOG[canon]) if canon else None


def hub_id(name: str) -> str | None:
    """The hub id ``name`` stands for: ``name`` itself when written as ``org/name``; else the
    catalog's hub id, of the instruct/chat variant when one was named (None: not in the catalog)."""
    hit = lookup(name)
    if hit is None:
        return None
    if "/" in name.strip().rstrip("/"):
        return name.strip().rstrip("/")
    _, suffix = _split(name)
    entry = hit[1]
    if suffix == "-base":
        return entry.get("base") or entry["hf_id"]
    if not suffix or entry["hf_id"].lower().endswith(suffix):
        return entry["hf_id"]
    return entry.get("instruct") or entry["hf_id"] + _VARIANT_SUFFIXES[suffix]
