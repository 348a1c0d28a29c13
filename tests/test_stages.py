"""Every LLaMA-Factory stage and the knobs that change memory, LF's refusals on the ladder, and never
being silent: unknown keys, non-training configs, and warnings for what the estimate does not model.

Expectations are derived from how LF, trl, peft and Liger lay out the tensors (sizes times bytes), not
from dsplan's constants.
"""

import importlib.util
import json
import math
from dataclasses import replace

import pytest
import yaml

from dsplan.estimate.activations import activation_bytes
from dsplan.estimate.estimate import estimate
from dsplan.estimate.stages import step_transients
from dsplan.estimate.workload import Workload, trainable_params
from dsplan.inputs.hardware import make_profile
from dsplan.inputs.model import LINEAR_NAMES, load_model_spec
from dsplan.inputs.settings import TrainSettings
from dsplan.plan.planner import make_plan, workload_from
from dsplan.plan.tiers import TIERS, get_tier
from dsplan.schema.lf import KEYS
from dsplan.schema.lf_names import LF_VERSION, OPTIM_NAMES, TRAIN_KEYS
from tests.conftest import REPO, run_dsplan

BF16, FP32 = 2, 4
Z2, Z3, Z3_OFF = get_tier("zero2"), get_tier("zero3"), get_tier("zero3_offload")


@pytest.fixture(scope="module")
def llama():
    return load_model_spec("Llama-3-8B")


def gpu(spec, w, tier=Z2, gpus="1x80G"):
    return estimate(spec, make_profile(gpus), tier, w).gpu


def write(tmp_path, name="u.yaml", **values):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model_name_or_path": "Llama-3-8B", "do_train": True, **values}))
    return str(path)


def plan_json(*args):
    r = run_dsplan("plan", *args, "--json")
    assert r.returncode in (0, 4), r.stderr
    return json.loads(r.stdout)


def one_line_error(r, needle):
    assert r.returncode == 2, (r.returncode, r.stdout[-300:], r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


# ---------------------------------------------------------------- dense SFT is what it was
@pytest.mark.parametrize("model", ["Llama-3-8B", "Qwen2.5-0.5B", "Qwen1.5-7B"])
@pytest.mark.parametrize("method", ["lora", "qlora", "full", "freeze"])
@pytest.mark.parametrize("gc,attention,cutoff,mb", [(True, "sdpa", 2048, 2), (False, "sdpa", 1024, 1),
                                                    (True, "eager", 512, 4), (True, "sdpa", 65536, 1)])
def test_plain_sft_phases_are_the_fitted_ones(model, method, gc, attention, cutoff, mb):
    spec = load_model_spec(model)
    w = Workload(method=method, cutoff_len=cutoff, micro_batch=mb, gradient_checkpointing=gc, attention=attention)
    for stage in ("sft", "pt"):
        parts = step_transients(spec, make_profile("8x80G"), Z3, replace(w, stage=stage))
        assert set(parts) == {"activations", "logits"}
        # ZeRO-3 keeps peft's adapters in fp32 (traced), which activation_bytes takes from the workload
        assert (parts["activations"], parts["logits"]) == activation_bytes(spec, replace(w, adapter_fp32=w.adapters))


# ---------------------------------------------------------------- pairs
@pytest.mark.parametrize("stage,loss", [("dpo", "orpo"), ("dpo", "simpo"), ("rm", "sigmoid")])
def test_pairs_are_two_sequences_per_sample(llama, stage, loss):
    # LF's PairwiseDataCollatorWithPadding concatenates chosen and rejected: b samples are 2b sequences.
    for gc in (True, False):
        pair = gpu(llama, Workload(stage=stage, pref_loss=loss, micro_batch=2, gradient_checkpointing=gc))
        sft = gpu(llama, Workload(stage="sft", micro_batch=4, gradient_checkpointing=gc))
        assert pair["activations"] == sft["activations"]
        if stage == "dpo":  # the same fp32 loss over twice the tokens
            assert pair["logits"] == sft["logits"]
    one = gpu(llama, Workload(stage="dpo", pref_loss="orpo", micro_batch=1, gradient_checkpointing=False))
    alone = gpu(llama, Workload(stage="sft", micro_batch=1, gradient_checkpointing=False))
    assert one["activations"] == pytest.approx(2 * alone["activations"], abs=2)


def test_reward_model_logits_are_never_backpropagated(llama):
    # trl's value-head model upcasts the 16-bit logits to fp32 and the pairwise loss uses only the
    # values: both copies exist at the end of forward, nothing of them in backward.
    w = Workload(stage="rm", cutoff_len=1024, micro_batch=3)
    tokens = 2 * 1024 * 3
    assert gpu(llama, w)["logits"] == (BF16 + FP32) * tokens * llama.vocab_size
    assert trainable_params(llama, w) == trainable_params(llama, replace(w, stage="sft")) + llama.hidden_size + 1


# ---------------------------------------------------------------- reference models
def test_dpo_reference_forward_runs_while_the_policy_holds_its_logits(llama):
    w = Workload(stage="dpo", pref_loss="sigmoid", cutoff_len=2048, micro_batch=1)
    parts = gpu(llama, w)
    tv = 2 * 2048 * llama.vocab_size
    # the policy's fp32 logits (their chosen/rejected views live on) and its saved log-softmax
    assert parts["logits"] == 2 * FP32 * tv
    # the reference's own fp32 logits and log-softmax, plus less than one layer's saved activations
    layer = gpu(llama, Workload(stage="sft", cutoff_len=2048, micro_batch=2, gradient_checkpointing=False))
    assert 2 * FP32 * tv < parts["ref_forward"] < 2 * FP32 * tv + layer["activations"] / llama.num_layers
    # reference-free losses run no reference forward
    for loss in ("orpo", "simpo"):
        assert "ref_forward" not in gpu(llama, replace(w, pref_loss=loss))


@pytest.mark.parametrize("method,copy", [("lora", False), ("qlora", False), ("full", True), ("freeze", True)])
def test_reference_copy_only_where_lf_creates_one(llama, method, copy):
    # create_ref_model: LoRA uses the base with adapters disabled; full/freeze load a second model.
    for stage, loss in (("dpo", "sigmoid"), ("kto", "sigmoid"), ("ppo", "sigmoid")):
        w = Workload(method=method, stage=stage, pref_loss=loss, reward_model_type="api")
        assert ("ref_model" in gpu(llama, w)) is copy, (stage, method)
        given = replace(w, ref_model="some/other-model")  # a ref_model given is always a copy
        assert "ref_model" in gpu(llama, given)
    assert "ref_model" not in gpu(llama, Workload(method=method, stage="dpo", pref_loss="orpo"))


def test_reference_copy_is_placed_as_deepspeed_prepares_it(llama):
    # trl's prepare_deepspeed: ZeRO-3 shards it (offloading its parameters with the policy's), other
    # stages run it at stage 0, whole on every GPU; a quantized reference is left whole.
    w = Workload(method="full", stage="dpo")
    whole = BF16 * llama.total_params
    for gpus, n in (("1x80G", 1), ("8x80G", 8), ("2x8x80G", 16)):
        assert gpu(llama, w, Z2, gpus)["ref_model"] == pytest.approx(whole, abs=1)
        assert gpu(llama, w, get_tier("zero2_offload"), gpus)["ref_model"] == pytest.approx(whole, abs=1)
        assert gpu(llama, w, Z3, gpus)["ref_model"] == pytest.approx(whole / n, abs=1)
    hw = make_profile("2x8x80G")
    off, on = estimate(llama, hw, Z3_OFF, w), estimate(llama, hw, Z3_OFF, replace(w, stage="sft"))
    assert off.gpu["ref_model"] == 0
    assert off.host["param_offload"] - on.host["param_offload"] == pytest.approx(1.5 * whole / 2, abs=2)
    lora = Workload(method="lora", stage="dpo", ref_model="x", ref_quantization_bit=4)
    q = gpu(llama, lora, Z3, "8x80G")["ref_model"]
    assert 0.25 * whole < q < 0.4 * whole  # 4-bit linears, 16-bit embeddings, on every GPU


def test_kto_kl_forward_saves_no_activations(llama):
    kto = gpu(llama, Workload(stage="kto", cutoff_len=2048, micro_batch=2))
    sft = gpu(llama, Workload(stage="sft", cutoff_len=2048, micro_batch=2))
    assert sft["logits"] > 0  # SFT's peak is at the loss, where the KTO forwards also run
    assert kto["activations"] == sft["activations"]  # the KL batch adds no saved activations
    tv = 2048 * 2 * llama.vocab_size
    kto_parts = step_transients(llama, make_profile("1x80G"), Z2, Workload(stage="kto", cutoff_len=2048,
                                                                           micro_batch=2))
    extra = kto_parts.get("ref_forward", 0) + kto_parts.get("kl_forward", 0)
    assert extra >= 2 * FP32 * tv  # a no-grad forward's fp32 logits and log-softmax, at least
    assert sum(kto_parts.values()) > sft["activations"] + sft["logits"]


# ---------------------------------------------------------------- ppo
def test_ppo_generation_kv_cache_and_zero3_gather(llama):
    w = Workload(method="full", stage="ppo", cutoff_len=1024, max_new_tokens=512, micro_batch=4,
                 reward_model_type="api")
    parts = step_transients(llama, make_profile("8x80G"), Z3_OFF, w)
    kv = 2 * llama.num_layers * llama.num_kv_heads * llama.head_dim * BF16 * 4 * (1024 + 512)
    assert parts["kv_cache"] == kv
    # trl's unwrap_model_for_generation gathers every 16-bit parameter on each GPU at ZeRO-3
    assert parts["generation_gather"] == BF16 * llama.total_params
    sharded = step_transients(llama, make_profile("8x80G"), Z3, w)
    assert sharded["generation_gather"] == pytest.approx(BF16 * llama.total_params * 7 / 8)
    assert "generation_gather" not in step_transients(llama, make_profile("8x80G"), Z2, w)


def test_ppo_trains_prompt_plus_response(llama):
    ppo = gpu(llama, Workload(stage="ppo", cutoff_len=1024, max_new_tokens=1024, reward_model_type="api"))
    sft = gpu(llama, Workload(stage="sft", cutoff_len=2048))
    assert ppo["activations"] == sft["activations"] and ppo["logits"] == sft["logits"]


def test_ppo_reward_model(llama):
    full = gpu(llama, Workload(method="full", stage="ppo", reward_model_type="full"))
    assert full["reward_model"] == pytest.approx(BF16 * llama.total_params, abs=1)
    lora = gpu(llama, Workload(method="lora", stage="ppo", reward_model_type="lora"))
    rank8 = 8 * sum(a + b for a, b in llama.linear_shapes().values()) * llama.num_layers
    assert lora["reward_model"] == pytest.approx(BF16 * rank8, abs=1)
    assert "reward_model" not in gpu(llama, Workload(stage="ppo", reward_model_type="api"))


# ---------------------------------------------------------------- knobs
def _next_pow2(n):
    return 1 << max(0, math.ceil(math.log2(n)))


@pytest.mark.parametrize("method,cutoff", [("lora", 32768), ("full", 4096), ("lora", 100)])
def test_liger_builds_no_full_logits(llama, method, cutoff):
    # Liger's fused_linear_cross_entropy_forward: chunk = next_pow2(cdiv(BT, cdiv(V, H))) rows of
    # 16-bit logits at a time, a 16-bit input gradient (BT x H), the lm_head's gradient if it trains.
    w = Workload(method=method, cutoff_len=cutoff, liger=True, gradient_checkpointing=False)
    bt, v, h = cutoff, llama.vocab_size, llama.hidden_size
    chunk = min(bt, _next_pow2(math.ceil(bt / math.ceil(v / h))))
    expected = BF16 * bt * h + BF16 * chunk * v + (BF16 * v * h if method == "full" else 0)
    assert gpu(llama, w)["logits"] == expected
    assert expected < gpu(llama, replace(w, liger=False))["logits"]


def test_liger_needs_a_patched_model_and_a_stage_without_logits(llama, tmp_path):
    plain = gpu(llama, Workload(stage="dpo", pref_loss="orpo"))
    assert gpu(llama, Workload(stage="dpo", pref_loss="orpo", liger=True)) == plain  # LF: require_logits
    odd = replace(llama, model_type="baichuan")
    assert gpu(odd, Workload(liger=True)) == gpu(odd, Workload())
    d = plan_json(write(tmp_path, stage="dpo", enable_liger_kernel=True, pref_loss="orpo"), "--gpus", "8x80G")
    assert any("enable_liger_kernel" in line and "dpo" in line for line in d["warnings"])


def test_liger_32k_fits_where_full_logits_do_not(tmp_path):
    base = {"finetuning_type": "lora", "cutoff_len": 32768}
    without = plan_json(write(tmp_path, **base), "--gpus", "1x80G")
    liger = plan_json(write(tmp_path, "l.yaml", **base, enable_liger_kernel=True), "--gpus", "1x80G")
    assert without["choice"] is None and liger["choice"] is not None and liger["warnings"] == []


def test_dora_adds_magnitudes_saved_outputs_and_a_workspace(llama):
    lora, dora = Workload(), Workload(use_dora=True)
    outs = sum(llama.linear_shapes()[t][1] for t in LINEAR_NAMES)
    assert trainable_params(llama, dora) - trainable_params(llama, lora) == outs * llama.num_layers
    d, p = gpu(llama, dora), gpu(llama, lora)
    # the identity (in x in), B@A and W + B@A of the largest linear, 16-bit
    assert d["dora_workspace"] == max(BF16 * (a * a + 2 * a * b) for a, b in llama.linear_shapes().values())
    nogc_d = gpu(llama, replace(dora, gradient_checkpointing=False))["activations"]
    nogc_p = gpu(llama, replace(lora, gradient_checkpointing=False))["activations"]
    assert nogc_d - nogc_p == 2 * BF16 * outs * 2048 * llama.num_layers  # base and LoRA outputs saved
    assert "dora_workspace" not in p


def test_oft_is_kept_and_sized(tmp_path, llama):
    # peft's OFTRotationModule: in/block blocks of block*(block-1)/2 parameters per adapted linear.
    w = Workload(adapter="oft", oft_block_size=32)
    per_layer = sum(a * 31 // 2 for a, _ in llama.linear_shapes().values())
    assert trainable_params(llama, w) == per_layer * llama.num_layers
    user = write(tmp_path, finetuning_type="oft", lora_rank=16)
    d = plan_json(user, "--gpus", "8x80G")
    assert any("oft" in line for line in d["warnings"]) and d["workload"]["adapter"] == "oft"
    r = run_dsplan("render", user, "--gpus", "8x80G", "--tier", "zero2", "-o", str(tmp_path / "o"))
    lf = yaml.safe_load((tmp_path / "o" / "lf_zero2.yaml").read_text())
    assert r.returncode == 0 and lf["finetuning_type"] == "oft" and lf["lora_target"] == "all"


def test_additional_target_and_resize_vocab_train_full_copies(llama):
    vh = llama.vocab_size * llama.hidden_size
    base = trainable_params(llama, Workload())
    both = Workload(extra_modules=("embed_tokens", "lm_head"))
    assert trainable_params(llama, both) == base + 2 * vh
    s = TrainSettings(model_name_or_path="x", resize_vocab=True)
    assert workload_from(s).extra_modules == ("embed_tokens", "lm_head")  # LF adds them itself
    assert workload_from(replace(s, additional_target="norm")).extra_modules == ("norm",)
    assert workload_from(replace(s, method="full")).extra_modules == ()


def test_freeze_counts_the_layers_lf_trains(llama):
    first, last = Workload(method="freeze", freeze_trainable_layers=-3), Workload(method="freeze",
                                                                                 freeze_trainable_layers=3)
    assert trainable_params(llama, first) == trainable_params(llama, last) == 3 * llama.params_per_layer
    assert all(v >= 0 for v in gpu(llama, first).values())
    mlp = replace(last, freeze_modules=("mlp",), extra_modules=("lm_head",))
    assert trainable_params(llama, mlp) == 3 * llama.mlp_params_per_layer + llama.vocab_size * llama.hidden_size


def test_quantization_methods(llama):
    lin, rest = llama.linear_params, llama.total_params - llama.linear_params
    hqq = Workload(method="qlora", quantization_bit=4, quantization_method="hqq")
    assert gpu(llama, hqq)["weights"] - 2 * trainable_params(llama, hqq) == pytest.approx(
        (0.5 + 2 * BF16 / 64) * lin + BF16 * rest, abs=2)  # 4 bits + an fp16 scale and zero per 64
    gptq = replace(hqq, quantization_method="gptq")  # LF quantizes nothing on the fly with gptq
    assert gpu(llama, gptq)["weights"] - 2 * trainable_params(llama, gptq) == pytest.approx(
        BF16 * llama.total_params, abs=2)


def test_pre_quantized_checkpoint(llama):
    gptq = replace(llama)
    object.__setattr__(gptq, "quantization", {"quant_method": "gptq", "bits": 4, "group_size": 128})
    w = Workload(method="lora")
    adapters = 2 * trainable_params(llama, w)
    lin, rest = llama.linear_params, llama.total_params - llama.linear_params
    weights = gpu(gptq, w)["weights"] - adapters  # 4 bits per linear weight plus its group scales
    assert 0.5 * lin + BF16 * rest < weights < (0.5 + 2 * BF16 / 128 + 0.02) * lin + BF16 * rest
    fp8 = replace(llama)
    object.__setattr__(fp8, "quantization", {"quant_method": "fp8"})  # LF dequantizes it at load
    assert gpu(fp8, w)["weights"] == gpu(llama, w)["weights"]
    hw = make_profile("8x80G")
    plan = make_plan(hw, gptq, TrainSettings(model_name_or_path="x", method="lora"))
    assert plan.get("zero3").refused == "DeepSpeed ZeRO-3 or FSDP is incompatible with PTQ-quantized models."
    assert plan.get("zero2").refused is None and "zero3" not in plan.ladder
    with pytest.raises(Exception, match="Quantized models can only be used for the LoRA or OFT tuning"):
        make_plan(hw, gptq, TrainSettings(model_name_or_path="x", method="full"))


def test_neat_packing_mask_without_fa2(tmp_path):
    d = plan_json(write(tmp_path, neat_packing=True, cutoff_len=4096, per_device_train_batch_size=2),
                  "--gpus", "8x80G")
    assert d["tiers"][0]["breakdown"]["attention_mask"] == BF16 * 2 * 4096 ** 2
    fa2 = plan_json(write(tmp_path, "f.yaml", neat_packing=True, flash_attn="fa2"), "--gpus", "8x80G")
    assert "attention_mask" not in fa2["tiers"][0]["breakdown"]


def test_optimizer_names_are_the_shipped_ones():
    from dsplan.estimate.model_states import optimizer_state_bytes

    assert optimizer_state_bytes("adamw_torch") == (8.0, False)
    assert optimizer_state_bytes("paged_lion_8bit") == (1.0, True)
    assert optimizer_state_bytes("sgd")[0] < optimizer_state_bytes("lion_32bit")[0] < 8
    assert "adamw_torch_fused" in OPTIM_NAMES


# ---------------------------------------------------------------- LF's refusals on the ladder
@pytest.mark.parametrize("knob,refused", [
    ({"use_unsloth": True}, (3,)),
    ({"predict_with_generate": True, "do_eval": True, "val_size": 0.1}, (3,)),
    ({"quantization_bit": 8}, (3,)),
    ({"quantization_bit": 4, "quantization_method": "hqq"}, (3,)),
    ({"quantization_bit": 4}, ()),
    ({"finetuning_type": "full", "use_badam": True}, (2,)),
    ({"pissa_init": True}, (3,)),
    ({"adapter_name_or_path": "a,b"}, (3,)),
])
def test_tiers_lf_refuses_are_never_chosen_nor_laddered(tmp_path, knob, refused):
    d = plan_json(write(tmp_path, **{"finetuning_type": "lora", **knob}), "--gpus", "8x80G")
    for t in d["tiers"]:
        stage = get_tier(t["tier"]).stage
        assert (t["refused_by_lf"] is not None) is (stage in refused), t["tier"]
        if t["refused_by_lf"]:
            assert t["tier"] not in d["ladder"] and d["choice"] != t["tier"]
            assert f"{t['tier']} refused by LLaMA-Factory: {t['refused_by_lf']}" in d["why"]
    text = run_dsplan("plan", write(tmp_path, **{"finetuning_type": "lora", **knob}), "--gpus", "8x80G").stdout
    assert ("refused by LLaMA-Factory" in text) is bool(refused)


@pytest.mark.parametrize("knob,needle", [
    ({"finetuning_type": "full", "use_galore": True}, "GaLore and APOLLO are incompatible with DeepSpeed yet."),
    ({"finetuning_type": "full", "use_badam": True, "badam_mode": "ratio"}, "Radio-based BAdam"),
    ({"optim": "galore_adamw_layerwise"}, "does not support DDP"),
    ({"finetuning_type": "lora", "quantization_bit": 3}, "Bitsandbytes only accepts 4-bit or 8-bit quantization."),
    ({"finetuning_type": "lora", "quantization_bit": 4, "quantization_method": "eetq"},
     "EETQ only accepts 8-bit quantization."),
])
def test_every_tier_refused_is_one_line(tmp_path, knob, needle):
    out = tmp_path / "out"
    for cmd in (["plan"], ["render", "-o", str(out)]):
        r = run_dsplan(*cmd, write(tmp_path, **knob), "--gpus", "8x80G")
        one_line_error(r, needle)
    assert not out.exists()


def test_hqq_takes_the_bits_lf_gives_it_and_sizes_them(tmp_path, llama):
    weights = {}
    for bits in (1, 3):
        d = plan_json(write(tmp_path, f"h{bits}.yaml", finetuning_type="lora", quantization_bit=bits,
                            quantization_method="hqq"), "--gpus", "1x80G")
        weights[bits] = {t["tier"]: t for t in d["tiers"]}["zero2"]["breakdown"]["weights"]
    h, kv, m = llama.hidden_size, llama.num_kv_heads * llama.head_dim, llama.intermediate_size
    linear = (2 * h * h + 2 * h * kv + 3 * h * m) * llama.num_layers  # q, o, k, v, gate, up, down: 6.98B
    per_bit = (weights[3] - weights[1]) / 2  # one more bit costs an eighth of a byte per linear weight
    assert per_bit == pytest.approx(linear / 8, rel=0.01)


def test_a_refused_tier_asked_for_is_one_line(tmp_path):
    user = write(tmp_path, use_unsloth=True)
    one_line_error(run_dsplan("plan", user, "--gpus", "8x80G", "--tier", "zero3"), "Unsloth is incompatible")
    one_line_error(run_dsplan("render", user, "--gpus", "8x80G", "--tier", "zero3_offload", "-o",
                              str(tmp_path / "o")), "Unsloth is incompatible")
    r = run_dsplan("render", user, "--gpus", "8x80G", "-o", str(tmp_path / "all"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted([
        "dsplan.json", "ds_zero2.json", "ds_zero2_offload.json", "lf_zero2.yaml", "lf_zero2_offload.yaml"])
    assert "zero3 is refused by LLaMA-Factory (not written)" in r.stdout and "warning: use_unsloth" in r.stdout


@pytest.mark.parametrize("knob,needle", [
    ({"stage": "ppo"}, "`reward_model` is necessary for PPO training."),
    ({"stage": "dpo", "neat_packing": True}, "`neat_packing` cannot be set as True except SFT."),
    ({"finetuning_type": "full", "use_dora": True}, "`use_dora` is only valid for LoRA training."),
    ({"finetuning_type": "lora", "use_galore": True}, "Cannot use LoRA with GaLore, APOLLO or BAdam together."),
    ({"quantization_bit": 4, "resize_vocab": True}, "Cannot resize embedding layers of a quantized model."),
    ({"stage": "ppo", "finetuning_type": "full", "reward_model": "rm"}, "`reward_model_type` cannot be lora"),
])
def test_configs_lf_refuses_whatever_the_tier(tmp_path, knob, needle):
    one_line_error(run_dsplan("plan", write(tmp_path, **knob), "--gpus", "8x80G"),
                   f"LLaMA-Factory {LF_VERSION} refuses this config: {needle}")


# ---------------------------------------------------------------- never silent
def test_unknown_key_with_a_suggestion(tmp_path):
    out = tmp_path / "out"
    r = run_dsplan("render", write(tmp_path, cutof_len=16384), "--gpus", "8x80G", "-o", str(out))
    one_line_error(r, "unknown key 'cutof_len' (did you mean cutoff_len?)")
    assert not out.exists()
    r = run_dsplan("plan", write(tmp_path, zzqx_nothing_like_it=1, zzzz_other=2), "--gpus", "8x80G")
    one_line_error(r, f"unknown key 'zzqx_nothing_like_it': LLaMA-Factory {LF_VERSION} does not define it "
                      "(and 1 more unknown)")
    one_line_error(run_dsplan("plan", write(tmp_path, train_mm_proj_only=True), "--gpus", "8x80G"),
                   "freeze_language_model")
    # an eval-only name in a training YAML is a plain unknown key, not "an eval config"
    one_line_error(run_dsplan("plan", write(tmp_path, batch_size=8), "--gpus", "8x80G"), "unknown key 'batch_size'")


def test_keys_of_the_older_transformers_lf_supports_are_kept_with_a_warning(tmp_path):
    # LF 0.9.5 runs on transformers 4.55 to 5.6; save_safetensors is a 4.55 argument 5.6 removed.
    d = plan_json(write(tmp_path, save_safetensors=True), "--gpus", "8x80G")
    assert [w for w in d["warnings"] if w.startswith("save_safetensors: an argument of transformers 4.55")]


def test_allow_extra_args_keeps_unknown_keys_with_a_warning(tmp_path):
    user = write(tmp_path, cutof_len=16384)
    r = run_dsplan("plan", user, "--gpus", "8x80G", "--json", env={"ALLOW_EXTRA_ARGS": "1"})
    d = json.loads(r.stdout)
    assert d["workload"]["cutoff_len"] == 2048  # LF ignores the key, and so does the estimate
    assert [w for w in d["warnings"] if "cutof_len" in w and "did you mean cutoff_len?" in w]
    assert [w for w in d["why"] if w.startswith("warning: cutof_len")]


@pytest.mark.parametrize("values,needle", [
    ({"do_train": False}, "not a training config (do_train: false)"),
    ({"do_train": None, "do_predict": True, "predict_with_generate": True}, "not a training config (do_predict"),
    ({"do_train": None, "task": "mmlu_test", "n_shot": 5}, "is an argument of `llamafactory-cli eval`"),
    ({"do_train": None, "export_dir": "out", "adapter_name_or_path": "a"}, "not a training config (export_dir"),
    ({"do_train": None, "infer_backend": "vllm"}, "not a training config (infer_backend"),
])
def test_non_training_configs_exit_2(tmp_path, values, needle):
    one_line_error(run_dsplan("plan", write(tmp_path, **values), "--gpus", "8x80G"), needle)


def test_warnings_for_what_the_estimate_does_not_model(tmp_path):
    d = plan_json(write(tmp_path, use_unsloth=True, lora_dropout=0.1, optim="schedule_free_adamw", fp8=True,
                        shift_attn=True), "--gpus", "8x80G")
    for needle in ("use_unsloth", "lora_dropout", "schedule_free_adamw", "fp8", "shift_attn"):
        assert [w for w in d["warnings"] if w.startswith(needle) or needle in w], needle
    assert [f"warning: {w}" for w in d["warnings"]] == [w for w in d["why"] if w.startswith("warning: ")]
    assert plan_json(write(tmp_path, "plain.yaml", finetuning_type="lora"), "--gpus", "8x80G")["warnings"] == []


def test_stage_is_planned_and_rendered(tmp_path):
    user = write(tmp_path, stage="dpo", finetuning_type="full", pref_beta=0.1)
    d = plan_json(user, "--gpus", "8x80G")
    assert d["workload"]["stage"] == "dpo" and "ref_model" in d["tiers"][0]["breakdown"]
    r = run_dsplan("render", user, "--gpus", "8x80G", "--tier", "zero3", "-o", str(tmp_path / "o"))
    lf = yaml.safe_load((tmp_path / "o" / "lf_zero3.yaml").read_text())
    assert r.returncode == 0 and lf["stage"] == "dpo" and lf["pref_beta"] == 0.1
    text = run_dsplan("plan", user, "--gpus", "8x80G").stdout
    assert "stage dpo sigmoid, reference: a copy" in text.splitlines()[0]


# ---------------------------------------------------------------- the shipped names
def test_every_schema_key_is_an_lf_argument():
    assert {k.name for k in KEYS} <= set(TRAIN_KEYS)
    assert {"cutoff_len", "per_device_train_batch_size", "pref_beta", "enable_liger_kernel"} <= set(TRAIN_KEYS)
    assert [t.name for t in TIERS] == ["zero2", "zero2_offload", "zero3", "zero3_offload"]


@pytest.mark.real
def test_shipped_names_match_the_installed_llamafactory():
    spec = importlib.util.spec_from_file_location("gen_lf_names", REPO / "scripts" / "gen_lf_names.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    names = gen.collect()
    names.update(gen.shipped_older())
    assert gen.render(names) == gen.TARGET.read_text(encoding="utf-8"), "run scripts/gen_lf_names.py"
    assert not set(names["OLDER_TRANSFORMERS_ONLY_KEYS"]) & set(names["TRAIN_KEYS"])
    assert names["LF_VERSION"] == LF_VERSION
