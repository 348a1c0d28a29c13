import json

import pytest

from dsplan.errors import UserError
from dsplan.inputs.model import LINEAR_NAMES, load_model_spec

# Parameter counts the model cards publish (rounded there); dsplan counts from config.json shapes.
PUBLISHED = {
    "Qwen2.5-0.5B": 0.49e9, "Qwen2.5-1.5B": 1.54e9, "Qwen2.5-3B": 3.09e9, "Qwen2.5-7B": 7.61e9,
    "Qwen2.5-14B": 14.7e9, "Qwen2.5-32B": 32.5e9, "Qwen2.5-72B": 72.7e9, "Llama-3-8B": 8.03e9,
    "Llama-3.1-70B": 70.6e9, "Mistral-7B-v0.1": 7.24e9, "DeepSeek-R1-Distill-Qwen-32B": 32.8e9,
}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_catalog_param_counts_match_model_cards(name, count):
    spec = load_model_spec(name)
    assert spec.total_params == pytest.approx(count, rel=0.01)


def test_catalog_covers_the_required_models():
    for name in ["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B", "Qwen2.5-32B",
                 "Qwen2.5-72B", "Qwen1.5-7B", "DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-R1-Distill-Qwen-7B",
                 "DeepSeek-R1-Distill-Qwen-14B", "DeepSeek-R1-Distill-Qwen-32B", "Llama-3-8B", "Llama-3-70B",
                 "Llama-3.1-8B", "Llama-3.1-70B", "Mistral-7B"]:
        load_model_spec(name)


def test_variants_and_hub_ids_resolve():
    assert load_model_spec("Qwen/Qwen2.5-7B-Instruct").name == "Qwen2.5-7B"
    assert load_model_spec("qwen1.5-7b-chat").name == "Qwen1.5-7B"
    # the shapes are the base model's; the hub id is the one the user wrote (issue 11: it was the base's)
    spec = load_model_spec("meta-llama/Meta-Llama-3-8B-Instruct")
    assert spec.name == "Llama-3-8B" and spec.hf_id == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_spec_fields(model_dir):
    spec = load_model_spec(str(model_dir))
    assert spec.path == str(model_dir.resolve())
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == (896, 24, 14, 2)
    assert spec.tie_word_embeddings and spec.lm_head_params == 0
    assert spec.largest_layer_params == 151936 * 896
    # one Qwen2 layer: q,k,v (+bias), o, gate/up/down, two norms
    attn = 896 * 896 + 2 * 896 * 128 + 896 * 896 + (896 + 2 * 128)
    assert spec.params_per_layer == attn + 3 * 896 * 4864 + 2 * 896
    assert spec.template == "qwen"
    # LoRA r8 on all 7 linears: r*(in+out) per module per layer
    per_layer = 8 * ((896 + 896) + 2 * (896 + 128) + (896 + 896) + 2 * (896 + 4864) + (4864 + 896))
    assert spec.lora_params(8) == 24 * per_layer


def test_model_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model_spec(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model_spec(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_model_spec(str(bad))
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="lacks"):
        load_model_spec(str(bad))
    with pytest.raises(UserError, match="unknown model"):
        load_model_spec("NotAModel-9B")


def _write(tmp_path, text):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(text)
    return str(d)


BASE_CFG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100}


@pytest.mark.parametrize("field,value,needle", [
    ("num_local_experts", -5, "zero or negative size num_local_experts"),
    ("num_key_value_heads", -1, "zero or negative"),
    ("hidden_size", 0, "zero or negative"),
    ("hidden_size", "64", "non-numeric"),
    ("hidden_size", 64.5, "non-numeric"),
    ("hidden_size", True, "non-numeric"),
    ("hidden_size", [64], "non-numeric"),
    ("num_hidden_layers", 10**9, "at most 10000"),
    ("vocab_size", 2**40, "at most"),
    ("num_attention_heads", 128, "more attention heads"),
    ("model_type", {"a": 1}, "model_type"),
])
def test_config_sizes_are_checked(tmp_path, field, value, needle):
    path = _write(tmp_path, json.dumps({**BASE_CFG, field: value}))
    with pytest.raises(UserError, match=needle):
        load_model_spec(path)


@pytest.mark.parametrize("text,needle", [
    ('{"hidden_size": Infinity}', "non-numeric"),
    ('{"hidden_size": NaN}', "non-numeric"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "5000 digits"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("caf\udce9", "not UTF-8"),
])
def test_hostile_config_json_is_one_error(tmp_path, text, needle):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError, match=needle):
        load_model_spec(str(d))


def test_optional_sizes_null_or_zero_take_their_defaults(tmp_path):
    path = _write(tmp_path, json.dumps({**BASE_CFG, "num_key_value_heads": None, "head_dim": 0,
                                        "num_local_experts": 0, "hidden_size": 64.0}))
    spec = load_model_spec(path)
    assert (spec.num_kv_heads, spec.head_dim, spec.num_experts, spec.hidden_size) == (4, 16, 1, 64)


def test_long_and_unprintable_model_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        load_model_spec(str(tmp_path / ("x" * 300)))
    assert len(str(e.value)) < 200
    with pytest.raises(UserError, match="at most 4096"):
        load_model_spec("y" * 5000)
    bad = tmp_path / "name\x1bwith-escape"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(BASE_CFG))
    with pytest.raises(UserError, match="contains the character"):
        load_model_spec(str(bad))


def test_negative_freeze_layers_count_the_first_layers():
    from dsplan.estimate.workload import Workload, trainable_params

    spec = load_model_spec("Qwen2.5-0.5B")
    last4 = trainable_params(spec, Workload(method="freeze", freeze_trainable_layers=4))
    first4 = trainable_params(spec, Workload(method="freeze", freeze_trainable_layers=-4))
    assert first4 == last4 == 4 * spec.params_per_layer
    assert trainable_params(spec, Workload(method="freeze", freeze_trainable_layers=-1000)) == \
        spec.num_layers * spec.params_per_layer


# ---- mixture of experts ---------------------------------------------------------------
MOE_BASE = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 256, "moe_intermediate_size": 32,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 100, "tie_word_embeddings": False}


def _spec(cfg, tmp_path):
    return load_model_spec(_write(tmp_path, json.dumps(cfg)))


@pytest.mark.parametrize("extra,moe_layers", [
    ({}, (0, 1, 2, 3, 4, 5)),
    ({"decoder_sparse_step": 2}, (1, 3, 5)),  # Qwen MoE: layer i is MoE when (i + 1) % step == 0
    ({"mlp_only_layers": [0, 4]}, (1, 2, 3, 5)),
    ({"model_type": "deepseek_v3", "first_k_dense_replace": 2}, (2, 3, 4, 5)),
    ({"model_type": "deepseek", "first_k_dense_replace": 1, "moe_layer_freq": 2}, (2, 4)),
    ({"model_type": "llama4_text", "interleave_moe_layer_step": 2}, (1, 3, 5)),  # Llama 4 Maverick's pattern
    ({"model_type": "llama4_text", "interleave_moe_layer_step": 1, "moe_layers": [0, 5]}, (0, 5)),
])
def test_moe_layer_patterns(tmp_path, extra, moe_layers):
    spec = _spec({**MOE_BASE, **extra}, tmp_path)
    assert spec.moe.layers == moe_layers
    dense_layer = 2 * 4 * 16 * 64 + 2 * 64 * 2 * 16 + 3 * 64 * 256  # q/o, k/v, MLP (llama4 also has no q/k norm)
    dense_count = 6 - len(moe_layers)
    moe_mlp = 8 * 64 + 8 * 3 * 64 * 32 + (3 * 64 * 32 if "llama4" in spec.model_type else 0)
    norms = 2 * 64 + (2 * 16 if spec.model_type == "qwen3_moe" else 0)
    assert spec.decoder_params == dense_count * (dense_layer + norms) + len(moe_layers) * (
        dense_layer - 3 * 64 * 256 + moe_mlp + norms)


@pytest.mark.parametrize("extra,top_k", [
    ({"num_experts_per_tok": 8}, 8), ({"num_experts_per_tok": None, "moe_topk": [3, 3]}, 3),
    ({"num_experts_per_tok": None, "num_experts_per_token": 4}, 4), ({"num_experts_per_tok": 99}, 8),
])
def test_moe_top_k_keys(tmp_path, extra, top_k):
    assert _spec({**MOE_BASE, **extra}, tmp_path).num_experts_per_tok == top_k


def test_shared_experts(tmp_path):
    ds = _spec({**MOE_BASE, "model_type": "deepseek_v2", "n_routed_experts": 8, "num_experts": None,
                "n_shared_experts": 2}, tmp_path)
    assert ds.moe.shared_width == 2 * 32 and not ds.moe.shared_gate and ds.moe.router_linear
    qw = _spec({**MOE_BASE, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 96}, tmp_path)
    assert qw.moe.shared_width == 96 and qw.moe.shared_gate
    names = {n for n, *_ in qw.linears()}
    assert {"shared_expert_gate", "gate_proj"} <= names  # the shared expert is nn.Linear, the routed are fused


def test_deepseek_moe_16b_counts_by_hand():
    """Remote code (no transformers build to compare with): count it from its module layout."""
    spec = load_model_spec("deepseek-moe-16b")
    h, v, layers = 2048, 102400, 28
    attn, norms = 4 * h * h, 2 * h
    dense = attn + 3 * h * 10944 + norms
    moe = attn + 64 * h + 64 * 3 * h * 1408 + 3 * h * 2 * 1408 + norms
    assert spec.total_params == 2 * v * h + dense + (layers - 1) * moe + h
    assert not spec.moe.fused  # one nn.Linear per expert: LoRA "all" wraps every one of them
    per_expert = 8 * ((h + 1408) * 2 + (1408 + h))
    assert spec.lora_params(8) == layers * 8 * 4 * 2 * h + 8 * ((h + 10944) * 2 + (10944 + h)) + \
        27 * (64 * per_expert + 8 * ((h + 2816) * 2 + (2816 + h)))
    assert spec.largest_layer_params == v * h  # no fused tensor: the embedding is the largest module


def test_fused_experts_are_not_linear():
    spec = load_model_spec("Qwen3-30B-A3B")
    h, q, kv = 2048, 32 * 128, 4 * 128
    attn_linear = h * q + 2 * h * kv + q * h
    assert spec.linear_params == 48 * attn_linear  # bitsandbytes leaves the fused experts 16-bit
    assert spec.lora_params(8) == 48 * 8 * ((h + q) + 2 * (h + kv) + (q + h))  # LF "all": attention only
    assert spec.largest_layer_params == 128 * 3 * h * 768  # ZeRO-3 gathers one layer's experts at once
    assert spec.largest_layer_params > spec.embedding_params
    with pytest.raises(UserError, match="known are q_proj, k_proj, v_proj, o_proj"):
        spec.lora_params(8, ("q_proj", "gate_proj"))
    assert load_model_spec("Mixtral-8x7B-v0.1").largest_layer_params == 8 * 3 * 4096 * 14336


def test_llama4_dense_width_and_shared_expert():
    spec = load_model_spec("Llama-4-Scout-17B-16E")
    assert spec.intermediate_size == 16384 and spec.moe.expert_width == 8192 and spec.moe.shared_width == 8192
    assert spec.num_experts_per_tok == 1 and len(spec.moe.layers) == 48
    assert spec.mlp_width_per_token == 8192 + 8192  # one routed expert and the shared one


def test_latent_attention():
    lite = load_model_spec("DeepSeek-V2-Lite")
    h, heads = 2048, 16
    assert lite.mla.q_lora_rank == 0
    assert lite.attn_params_per_layer == h * heads * 192 + h * (512 + 64) + 512 * heads * 256 + heads * 128 * h + 512
    v3 = load_model_spec("DeepSeek-V3")
    assert v3.mla.q_lora_rank == 1536 and v3.moe.layers[0] == 3 and len(v3.moe.layers) == 58
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= set(v3.linear_shapes())


def test_freeze_layers_params_follow_the_layer_kinds():
    spec = load_model_spec("DeepSeek-V3")
    assert spec.layers_params(2) == 2 * spec.params_per_layer  # the last layers are MoE layers
    assert spec.layers_params(-1) == spec.layer_params(0) < spec.params_per_layer  # the first is dense


@pytest.mark.parametrize("extra,needle", [
    ({"num_experts_per_tok": -1}, "zero or negative size num_experts_per_tok"),
    ({"mlp_only_layers": [99]}, "not a layer index"),
    ({"mlp_only_layers": "all"}, "not a list of layer indices"),
    ({"model_type": "llama4_text", "moe_layers": [True]}, "not a layer index"),
    ({"n_routed_experts": "8"}, "non-numeric size n_routed_experts"),
    ({"num_experts_per_tok": None, "moe_topk": [2, "x"]}, "non-numeric"),
    ({"model_type": "deepseek_v3", "kv_lora_rank": 8}, "lacks 'qk_nope_head_dim'"),
])
def test_bad_moe_fields(tmp_path, extra, needle):
    with pytest.raises(UserError, match=needle):
        _spec({**MOE_BASE, **extra}, tmp_path)


def test_moe_activations_use_the_real_top_k():
    from dsplan.estimate.activations import (ACT_H, ACT_I, ACT_KV, ACT_Q, FROZEN_EXPERT_H, FROZEN_EXPERT_I,
                                             LORA_ACT_H, LORA_QK_NORM, QK_NORM_KV, QK_NORM_Q,
                                             layer_act_bytes_per_token)
    from dsplan.estimate.workload import Workload

    spec, w = load_model_spec("Qwen3-30B-A3B"), Workload(method="full")
    h, q, kv = 2048, 32 * 128, 4 * 128  # Qwen3's q is twice its hidden size
    attn = ACT_H * h + ACT_Q * q + ACT_KV * kv + QK_NORM_Q * q + QK_NORM_KV * kv
    assert layer_act_bytes_per_token(spec, w) == pytest.approx(attn + ACT_I * 8 * 768 + 4 * 8 * h + 8 * 128)
    # LoRA wraps no MLP linear here (fused experts, no shared expert): the frozen norms and experts save less
    lora = layer_act_bytes_per_token(spec, Workload(method="lora")) - layer_act_bytes_per_token(spec, w)
    assert lora == pytest.approx(LORA_ACT_H * h + LORA_QK_NORM * (q + kv) - 8 * (FROZEN_EXPERT_H * h
                                                                                 + FROZEN_EXPERT_I * 768))
    dense = load_model_spec("Qwen2.5-7B")
    assert layer_act_bytes_per_token(dense, w) == pytest.approx(ACT_H * 3584 + ACT_Q * 3584 + ACT_KV * 512
                                                                + ACT_I * 18944)


def test_zero3_gather_is_the_fused_experts():
    from dsplan.codes import Component
    from dsplan.estimate.estimate import estimate
    from dsplan.estimate.workload import Workload
    from dsplan.inputs.hardware import make_profile
    from dsplan.plan.tiers import get_tier

    spec = load_model_spec("Qwen3-30B-A3B")
    est = estimate(spec, make_profile("8x80G"), get_tier("zero3"), Workload(method="full"))
    assert est.gpu[Component.ZERO3_GATHER.value] == 4 * 128 * 3 * 2048 * 768


def test_to_dict_adds_the_architecture_only_when_there_is_one(model_dir):
    assert "architecture" not in load_model_spec(str(model_dir)).to_dict()
    d = load_model_spec("Qwen3-VL-30B-A3B").to_dict()
    assert d["architecture"]["moe"]["top_k"] == 8 and d["architecture"]["vision"]["patch_size"] == 16
    assert d["architecture"]["qk_norm"] is True


# ---- vision-language models -------------------------------------------------------------
def test_vision_tower_fields():
    q25 = load_model_spec("Qwen2.5-VL-7B")
    v = q25.vision
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.depth, v.hidden_size) == (14, 2, 2, 32, 1280)
    assert q25.vision_params == v.tower_params + v.projector_params and q25.total_params == \
        q25.text_params + q25.vision_params
    assert q25.text_params == load_model_spec("Qwen2.5-7B").total_params  # the same LM under the tower
    q3 = load_model_spec("Qwen3-VL-4B").vision
    assert (q3.patch_size, q3.spatial_merge_size, q3.image_size) == (16, 2, None)  # dynamic resolution
    g3 = load_model_spec("gemma-3-4b").vision
    assert (g3.image_size, g3.patch_size, g3.tokens_per_image) == (896, 14, 256)
    assert 0.39e9 < g3.tower_params < 0.42e9  # SigLIP-So400m
    assert load_model_spec("Llama-4-Scout-17B-16E").vision.image_size == 336


def test_unmodelled_vision_tower_is_said(tmp_path):
    cfg = {"model_type": "mllama", "text_config": {**BASE_CFG, "model_type": "mllama_text_model"},
           "vision_config": {"hidden_size": 1280, "num_hidden_layers": 32}}
    spec = _spec(cfg, tmp_path)
    assert spec.vision is None and spec.vision_params == 0 and spec.num_layers == 2
    assert spec.warnings[1:] == ("the vision tower (mllama) is not counted",)
    assert spec.warnings[0].startswith("model_type mllama is not one dsplan's counts were checked on")
    assert spec.to_dict()["architecture"]["warnings"] == list(spec.warnings)


@pytest.mark.parametrize("vision,needle", [
    ({"depth": -1}, "zero or negative size depth"),
    ({"depth": 2, "embed_dim": "x"}, "non-numeric size embed_dim"),
    ({"depth": 2, "embed_dim": 8, "mlp_ratio": 1 << 20}, "at most"),
])
def test_bad_vision_fields(tmp_path, vision, needle):
    cfg = {**BASE_CFG, "model_type": "qwen2_vl", "vision_config": {"embed_dim": 8, "mlp_ratio": 4, "num_heads": 2,
                                                                   "patch_size": 14, "temporal_patch_size": 2,
                                                                   "spatial_merge_size": 2, **vision}}
    with pytest.raises(UserError, match=needle):
        _spec(cfg, tmp_path)


def test_quantization_config_is_kept(tmp_path):
    q = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    spec = _spec({**BASE_CFG, "quantization_config": q}, tmp_path)
    assert spec.quantization == q
    assert load_model_spec("Qwen2.5-7B").quantization is None


def test_lora_target_names_follow_the_layout():
    assert load_model_spec("Qwen2.5-7B").lora_target_names == LINEAR_NAMES
    assert load_model_spec("Phi-4-mini").lora_target_names == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert load_model_spec("glm-4-9b").lora_target_names == ("query_key_value", "dense", "dense_h_to_4h",
                                                             "dense_4h_to_h")
    assert load_model_spec("internlm2_5-7b").lora_target_names == ("wqkv", "wo", "w1", "w3", "w2")
    assert load_model_spec("DeepSeek-V2-Lite").lora_target_names[-4:] == ("gate_proj", "up_proj", "down_proj", "gate")
    spec = load_model_spec("Qwen2.5-0.5B")
    assert spec.dora_params() == 24 * (896 + 128 + 128 + 896 + 4864 + 4864 + 896)


def test_a_moe_config_without_top_k_says_top_2_is_assumed(tmp_path):
    cfg = {k: v for k, v in {**MOE_BASE, "model_type": "mixtral"}.items() if k != "num_experts_per_tok"}
    spec = _spec(cfg, tmp_path)
    assert spec.moe.top_k == 2 and any("top-2 routing assumed" in w for w in spec.warnings)
    (tmp_path / "b").mkdir()
    assert not any("top-2" in w for w in _spec({**MOE_BASE, "model_type": "mixtral"}, tmp_path / "b").warnings)


@pytest.mark.parametrize("extra,fused,warned", [
    ({"model_type": "mixtral"}, True, False),
    ({"model_type": "deepseek"}, False, False),
    ({"model_type": "my_moe", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyMoe"}}, False, False),
    ({"model_type": "my_moe"}, True, True),
])
def test_expert_storage_by_family(tmp_path, extra, fused, warned):
    spec = _spec({**MOE_BASE, **extra}, tmp_path)
    assert spec.moe.fused is fused and any("MoE layout" in w for w in spec.warnings) is warned
    unchecked = any("is not one dsplan's counts were checked on" in w for w in spec.warnings)
    assert unchecked is (extra["model_type"] == "my_moe")  # the catalog's families are the checked ones
