"""The memory model: DeepSpeed's own estimators, relations that follow from how ZeRO and the
loss work, the seeds' real scenarios, and the fallback ladder built on the estimates."""

import struct
from dataclasses import replace

import pytest

from dsplan.estimate.activations import activation_bytes, logits_bytes
from dsplan.estimate.estimate import estimate
from dsplan.estimate.workload import Workload, adapter_params, trainable_params
from dsplan.inputs.hardware import make_profile
from dsplan.inputs.model import load_model_spec
from dsplan.inputs.settings import TrainSettings
from dsplan.plan.fallback import divisors, ladder_from, next_step, next_tier, smaller_micro_batch
from dsplan.plan.planner import LEAN_MAX_LIVE, make_plan, workload_from
from dsplan.plan.tiers import TIERS, get_tier
from dsplan.schema.ds import ZeroOptimization
from dsplan.units import GiB

MODEL_STATE_PARTS = ("weights", "gradients", "optimizer", "zero3_gather")
#: Parts of the GPU estimate that do not depend on where the optimizer or the parameters live.
PLACEMENT_FREE_PARTS = ("activations", "logits", "ds_buffers", "zero3_gather", "zero3_live", "overhead")
FP32 = struct.calcsize("f")


def model_states(est):
    return sum(est.gpu.get(k, 0) for k in MODEL_STATE_PARTS)


# ---------------------------------------------------------------- DeepSpeed's estimators
@pytest.mark.real
@pytest.mark.parametrize("model", ["Qwen2.5-7B", "Llama-3-70B", "Qwen2.5-0.5B"])
@pytest.mark.parametrize("gpus", ["1x80G", "8x80G", "2x8x80G"])
@pytest.mark.parametrize("tier", ["zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_full_ft_model_states_match_deepspeed(model, gpus, tier):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    spec = load_model_spec(model)
    hw = make_profile(gpus)
    t = get_tier(tier)
    est = estimate(spec, hw, t, Workload(method="full"))
    if t.stage == 2:
        _, ds_gpu = estimate_zero2_model_states_mem_needs(
            spec.total_params, hw.gpus_per_node, hw.nodes, cpu_offload=t.offload_optimizer)
    else:
        ds_host, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
            spec.total_params, spec.largest_layer_params, hw.gpus_per_node, hw.nodes,
            cpu_offload=t.offload_optimizer, cpu_offload_params=t.offload_param, zero_init=True)
        if t.offload_optimizer:  # offloaded states on the host: same bytes, same 1.5 buffer factor
            ours = est.host.get("optimizer_offload", 0) + est.host.get("param_offload", 0)
            assert ours == pytest.approx(ds_host, rel=0.03)
    assert model_states(est) == pytest.approx(ds_gpu - _no_fp32_gradient(spec.total_params, hw.world_size, t),
                                              rel=0.03)


def _no_fp32_gradient(params: int, world: int, tier) -> float:
    """Where dsplan departs from DeepSpeed's estimators, by what the real code path showed
    (tests/data/real_path_facts.json).  Fused AdamW under DeepSpeed keeps no fp32 gradient
    between steps, which both of DeepSpeed's estimators count (4 B/N); ZeRO-3 keeps a 16-bit
    gradient partition, which its estimator does not count (2 B/N; ZeRO-2's 18 B includes
    one).  Offloaded tiers keep those states on the host: nothing differs on the GPU there."""
    if tier.offload_optimizer:
        return 0.0
    return (4.0 - (2.0 if tier.stage == 3 else 0.0)) * params / world


def test_dsplan_adds_named_components_beyond_model_states():
    est = estimate(load_model_spec("Qwen2.5-7B"), make_profile("8x80G"), get_tier("zero3"), Workload(method="full"))
    for part in ("activations", "logits", "ds_buffers", "zero3_live", "overhead"):
        assert est.gpu[part] > 0
    assert est.gpu_bytes > model_states(est)


# ---------------------------------------------------------------- relations from first principles
@pytest.mark.parametrize("model", ["Qwen1.5-7B", "Llama-3-8B", "Qwen2.5-0.5B"])
@pytest.mark.parametrize("cutoff,mb", [(2048, 2), (512, 1), (4096, 3)])
def test_loss_peak_is_three_fp32_copies_of_the_logits(model, cutoff, mb):
    # transformers' ForCausalLMLoss: logits.float() then cross_entropy = log_softmax + nll_loss.
    # In backward, log_softmax's saved fp32 output, the fp32 gradient nll_loss hands it and the
    # fp32 gradient it returns are alive together; the 16-bit logits are gone (the Trainer drops
    # the model output) and the fp32 upcast was not saved.  Nothing here uses dsplan's constants.
    spec = load_model_spec(model)
    tokens, vocab = cutoff * mb, spec.vocab_size
    fp32_tensors_at_peak = ["log_softmax output (saved)", "grad of log_softmax output", "grad of its input"]
    expected = len(fp32_tensors_at_peak) * FP32 * tokens * vocab
    for w in (Workload(method="lora", cutoff_len=cutoff, micro_batch=mb),
              Workload(method="qlora", cutoff_len=cutoff, micro_batch=mb, gradient_checkpointing=False),
              Workload(method="freeze", cutoff_len=cutoff, micro_batch=mb, attention="eager", lora_rank=64)):
        assert logits_bytes(spec, w) == expected


@pytest.mark.parametrize("method", ["full", "lora"])
def test_zero3_weights_per_gpu_shrink_as_one_over_n(method):
    spec, tier, w = load_model_spec("Qwen2.5-14B"), get_tier("zero3"), Workload(method=method)
    one = estimate(spec, make_profile("1x80G"), tier, w).gpu["weights"]
    for gpus, n in (("2x80G", 2), ("8x80G", 8), ("2x8x80G", 16)):
        assert estimate(spec, make_profile(gpus), tier, w).gpu["weights"] == pytest.approx(one / n, abs=1)
    # ZeRO-2 replicates the weights: the same on every GPU whatever the world size.  Its LoRA adapters
    # are 16-bit (DeepSpeed casts them); ZeRO-3 keeps peft's fp32 ones (traced: scripts/trace_memory.py).
    z2 = [estimate(spec, make_profile(g), get_tier("zero2"), w).gpu["weights"] for g in ("1x80G", "8x80G")]
    fp32_adapters = 2 * adapter_params(spec, w) if w.adapters else 0
    assert z2[0] == z2[1] == pytest.approx(one - fp32_adapters, abs=1)


@pytest.mark.parametrize("gpus", ["8x80G", "2x4x80G"])
@pytest.mark.parametrize("stage", [2, 3])
def test_offload_moves_the_optimizer_partitions_to_the_host(gpus, stage):
    spec, hw, w = load_model_spec("Llama-3-8B"), make_profile(gpus), Workload(method="full")
    on_gpu = estimate(spec, hw, get_tier(f"zero{stage}"), w)
    off = estimate(spec, hw, get_tier(f"zero{stage}_offload"), w)
    assert off.gpu["optimizer"] == off.gpu["gradients"] == 0
    assert "optimizer_step" not in off.gpu  # DeepSpeed's CPU Adam steps on the host
    # What leaves each GPU (master, m and v, and the fp32 gradient the step makes) lands in its node's
    # RAM, once per GPU of the node, plus DeepSpeed's 50 % for pinned buffers.
    fp32_grads = 4 * spec.total_params / hw.world_size
    moved = on_gpu.gpu["optimizer"] + fp32_grads
    assert off.host["optimizer_offload"] == pytest.approx(1.5 * hw.gpus_per_node * moved, rel=1e-6)
    if stage == 3:  # ZeRO-3 offload also moves the 16-bit parameter shards
        assert off.gpu["weights"] == 0
        assert off.host["param_offload"] == pytest.approx(1.5 * hw.gpus_per_node * on_gpu.gpu["weights"], rel=1e-6)
    for part in PLACEMENT_FREE_PARTS:
        assert off.gpu.get(part) == on_gpu.gpu.get(part), part
    assert off.host_bytes > on_gpu.host_bytes


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("gc", [True, False])
def test_more_tokens_more_activations(method, gc):
    spec = load_model_spec("Llama-3-8B")
    base = Workload(method=method, gradient_checkpointing=gc)
    prev = 0.0
    for cutoff, mb in ((256, 1), (512, 1), (512, 2), (2048, 2), (4096, 4)):
        act, logits = activation_bytes(spec, replace(base, cutoff_len=cutoff, micro_batch=mb))
        assert act + logits > prev
        prev = act + logits
    # micro-batch and cutoff enter only as tokens (SDPA keeps no T^2 score matrix)
    assert activation_bytes(spec, replace(base, cutoff_len=1024, micro_batch=2)) == pytest.approx(
        activation_bytes(spec, replace(base, cutoff_len=2048, micro_batch=1)))


def test_checkpointing_and_sdpa_save_activation_memory():
    spec = load_model_spec("Qwen2.5-7B")
    w = Workload(method="lora", cutoff_len=2048, gradient_checkpointing=False)
    full_act, _ = activation_bytes(spec, w)
    gc_act, _ = activation_bytes(spec, replace(w, gradient_checkpointing=True))
    eager_act, _ = activation_bytes(spec, replace(w, attention="eager"))
    assert gc_act < full_act / 4
    assert eager_act > full_act


def test_estimate_reads_the_zero_block_it_is_given():
    spec, hw, w = load_model_spec("Qwen2.5-7B"), make_profile("8x24G"), Workload(method="full")
    z3, z2 = get_tier("zero3"), get_tier("zero2")
    base3 = estimate(spec, hw, z3, w, ZeroOptimization(stage=3))
    lean3 = estimate(spec, hw, z3, w, ZeroOptimization(stage=3, stage3_max_live_parameters=LEAN_MAX_LIVE))
    assert base3.gpu["zero3_live"] == 2 * 1_000_000_000 and lean3.gpu["zero3_live"] == 2 * LEAN_MAX_LIVE
    big = estimate(spec, hw, z2, w, ZeroOptimization(stage=2, allgather_bucket_size=500_000_000))
    small = estimate(spec, hw, z2, w, ZeroOptimization(stage=2, allgather_bucket_size=200_000_000))
    assert big.gpu["ds_buffers"] - small.gpu["ds_buffers"] == 2 * 300_000_000
    # "auto" is what HF fills in: hidden^2 for the reduce bucket
    h2 = spec.hidden_size ** 2
    explicit = estimate(spec, hw, z2, w, ZeroOptimization(stage=2, reduce_bucket_size=h2))
    assert explicit.gpu == estimate(spec, hw, z2, w, ZeroOptimization(stage=2)).gpu


def test_each_tier_is_estimated_with_the_config_it_renders():
    plan = plan_for("Llama-3-8B", "8x24G", "full", 1024, 1, gpu_name="3090", precision="fp16")
    w = workload_from(plan.settings)
    for tp in plan.tiers:
        zero = tp.ds.zero_optimization
        assert zero.stage == tp.tier.stage
        assert (zero.offload_optimizer is not None) is tp.tier.offload_optimizer
        assert (zero.offload_param is not None) is tp.tier.offload_param
        again = estimate(plan.model, plan.profile, tp.tier, replace(w, micro_batch=tp.micro_batch), zero)
        assert again == tp.estimate
    assert plan.get("zero2").ds.zero_optimization.allgather_bucket_size == 200_000_000  # a card under 40 GiB


# ---------------------------------------------------------------- the seeds' scenarios
def plan_for(model, gpus, method, cutoff, mb, backend="cuda", host_ram="512G", gpu_name=None, rank=8,
             precision="bf16", ga=8):
    hw = make_profile(gpus, backend, host_ram, gpu_name)
    spec = load_model_spec(model)
    settings = TrainSettings(model_name_or_path=model, method=method, cutoff_len=cutoff, micro_batch=mb,
                             grad_accum=ga, lora_rank=rank, precision=precision,
                             quantization_bit=4 if method == "qlora" else None)
    return make_plan(hw, spec, settings)


def test_seed_002_qwen15_7b_qlora_on_16gb():
    big = plan_for("Qwen1.5-7B", "1x16G", "qlora", 2048, 2, rank=32, ga=8)
    assert big.choice is None or big.chosen.micro_batch < 2  # mb 2 x 2048 fits nowhere as asked
    assert not any(t.fits and t.micro_batch == 2 for t in big.tiers)
    small = plan_for("Qwen1.5-7B", "1x16G", "qlora", 1024, 1, rank=32, ga=16)
    assert small.choice is not None
    gib = small.chosen.estimate.gpu_bytes / GiB
    assert 9 <= gib <= 13, gib  # the seed's own estimate: ~10-12 GB


def test_seed_003_r1_distill_32b_lora_on_8_k100():
    plan = plan_for("DeepSeek-R1-Distill-Qwen-32B", "8x64G", "lora", 1024, 1, backend="rocm", gpu_name="K100")
    assert not plan.get("zero2").fits  # 65 GB of 16-bit weights per card do not fit 64 GB
    assert plan.choice in ("zero3", "zero3_offload")


def test_lf_issue_5977_llama3_8b_full_on_8x3090_needs_offload():
    plan = plan_for("Llama-3-8B", "8x24G", "full", 1024, 1, gpu_name="3090", precision="fp16", host_ram="512G")
    spec, n = plan.model, 8
    # ZeRO-3's model states alone, by DeepSpeed's formula (18 B per parameter over N GPUs plus
    # 4 B x the largest layer), already take most of a 24 GB card.
    states = 18 * spec.total_params / n + 4 * spec.largest_layer_params
    assert states > 0.8 * plan.usable_gpu
    assert not plan.get("zero3").fits
    assert plan.get("zero3_offload").fits and plan.choice == "zero3_offload"


def test_lora_zero2_offload_saves_almost_nothing_and_is_dropped():
    plan = plan_for("Qwen2.5-7B", "8x24G", "lora", 2048, 1, gpu_name="4090")
    z2, z2o = plan.get("zero2").estimate.gpu_bytes, plan.get("zero2_offload").estimate.gpu_bytes
    assert z2 - z2o < 0.5 * GiB
    assert "zero2_offload" not in plan.ladder


def test_lora_zero3_saves_far_less_on_2_gpus_than_on_8():
    # LoRA: ZeRO-3's saving is sharding the frozen 16-bit base weights, 2P(1 - 1/N).
    two = plan_for("Qwen2.5-14B", "2x80G", "lora", 1024, 1)
    eight = plan_for("Qwen2.5-14B", "8x80G", "lora", 1024, 1)
    save2 = two.get("zero2").estimate.gpu_bytes - two.get("zero3").estimate.gpu_bytes
    save8 = eight.get("zero2").estimate.gpu_bytes - eight.get("zero3").estimate.gpu_bytes
    assert save8 > 1.5 * save2


def test_zero3_on_one_gpu_costs_more_and_is_dropped():
    plan = plan_for("Qwen2.5-1.5B", "1x24G", "lora", 1024, 1)
    assert plan.get("zero3").estimate.gpu_bytes > plan.get("zero2").estimate.gpu_bytes
    assert "zero3" not in plan.ladder


def test_host_ram_refuses_offload_tiers():
    plan = plan_for("Llama-3-70B", "8x80G", "full", 1024, 1, host_ram="256G")
    for name in ("zero2_offload", "zero3_offload"):
        assert not plan.get(name).fits_host and name not in plan.ladder
    assert any("refused" in w for w in plan.why)


def test_micro_batch_lowered_keeping_effective_batch():
    plan = plan_for("Qwen2.5-7B", "1x24G", "qlora", 4096, 8, ga=2)
    c = plan.chosen
    assert c is not None and c.micro_batch < 8
    assert c.micro_batch * c.grad_accum == 16
    assert any("micro-batch" in w for w in plan.why)


def test_degrading_needs_permission():
    hw = make_profile("1x16G", host_ram="32G")  # too little host RAM to offload 7B parameters
    spec = load_model_spec("Qwen2.5-7B")
    s = TrainSettings(model_name_or_path="x", method="lora", cutoff_len=2048, micro_batch=1)
    assert make_plan(hw, spec, s).choice is None
    p = make_plan(hw, spec, s, allow_qlora=True)
    assert p.choice is not None and p.settings.method == "qlora" and p.degraded


# ---------------------------------------------------------------- the fallback ladder
def test_next_tier_follows_the_ladder_and_the_kind_of_memory():
    plan = plan_for("Llama-3-8B", "8x80G", "full", 2048, 1, host_ram="1024G")
    assert plan.ladder[0] == plan.choice
    lower = next_tier(plan, plan.ladder[0], "gpu_oom")
    assert lower in plan.ladder and (plan.get(lower).estimate.gpu_bytes < plan.get(plan.ladder[0]).estimate.gpu_bytes)
    # a host OOM never moves to a tier that needs more host RAM
    nxt = next_tier(plan, "zero3", "host_oom")
    assert nxt is None or plan.get(nxt).estimate.host_bytes <= plan.get("zero3").estimate.host_bytes
    assert next_tier(plan, plan.ladder[-1], "gpu_oom") is None


def test_a_start_outside_the_ladder_goes_first():
    plan = plan_for("Qwen2.5-1.5B", "1x24G", "lora", 1024, 1)
    assert "zero3" not in plan.ladder
    order = ladder_from(plan, "zero3")
    assert order[0] == "zero3"
    top = plan.get("zero3").estimate.gpu_bytes
    assert all(plan.get(n).estimate.gpu_bytes < top for n in order[1:])


def test_below_the_last_tier_the_micro_batch_shrinks_keeping_the_product():
    plan = plan_for("Qwen2.5-7B", "8x80G", "lora", 1024, 6, ga=2)
    last = plan.ladder[-1]
    assert next_step(plan, last, 6, 2, "gpu_oom") == (last, 3, 4)
    assert next_step(plan, last, 5, 3, "gpu_oom") == (last, 1, 15)  # 15's divisors up to 2: 1
    assert next_step(plan, last, 1, 12, "gpu_oom") is None


def test_divisors_match_brute_force():
    for n in range(1, 400):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]


def test_a_huge_micro_batch_steps_down_to_its_next_divisor():
    prime = 1_000_000_000_039  # a prime: every candidate up to its square root is tried (its speed: bench_input_fuzz)
    assert smaller_micro_batch(prime, 1) == (1, prime)
    assert smaller_micro_batch(2 ** 40, 3) == (2 ** 39, 6)


def test_eight_bit_and_paged_optimizers():
    spec, hw, tier = load_model_spec("Qwen2.5-7B"), make_profile("8x80G", host_ram="1024G"), get_tier("zero2")
    base = estimate(spec, hw, tier, Workload(method="full"))
    eight = estimate(spec, hw, tier, Workload(method="full", optim="adamw_bnb_8bit"))
    paged = estimate(spec, hw, tier, Workload(method="full", optim="paged_adamw_32bit"))
    n, p = 8, spec.total_params
    assert base.gpu["optimizer"] == pytest.approx(12 * p / n, rel=1e-6)  # fp32 master, m and v
    assert eight.gpu["optimizer"] == pytest.approx(6 * p / n, rel=1e-6)  # m, v in 8 bits: ~2 B instead of 8
    assert paged.gpu["optimizer"] == pytest.approx(4 * p / n, rel=1e-6)  # m, v paged out to host
    assert paged.host["paged_optimizer"] == pytest.approx(8 * p, rel=1e-6)


def test_every_optimizer_hf_accepts_has_a_state_size():
    from dsplan.estimate.model_states import optimizer_state_bytes
    from dsplan.schema.lf_names import OPTIM_NAMES

    spec, hw, tier = load_model_spec("Qwen2.5-0.5B"), make_profile("1x80G", host_ram="512G"), get_tier("zero2")
    for name in OPTIM_NAMES:
        state, paged = optimizer_state_bytes(name)
        assert 0 <= state <= 12 and paged is name.startswith("paged_"), name
        est = estimate(spec, hw, tier, Workload(method="full", optim=name))
        # the fp32 master (4 B) always; the states on the GPU unless paged (the fp32 gradient lives in the step)
        assert est.gpu["optimizer"] == pytest.approx((4 + (0 if paged else state)) * spec.total_params, rel=1e-6)


def test_each_extra_checkpoint_is_read_into_the_page_cache():
    spec, hw, tier = load_model_spec("Qwen2.5-7B"), make_profile("8x80G"), get_tier("zero2")
    one = estimate(spec, hw, tier, Workload(method="full", stage="dpo")).host["checkpoint_cache"]
    assert one == 2 * spec.total_params  # the reference is the same checkpoint, already cached
    given = estimate(spec, hw, tier, Workload(method="full", stage="dpo", ref_model="other")).host
    assert given["checkpoint_cache"] == 2 * one


def test_lora_target_subset_counts_only_those_modules():
    spec, hw, tier = load_model_spec("Llama-3-8B"), make_profile("1x80G"), get_tier("zero2")
    qv = estimate(spec, hw, tier, Workload(method="lora", lora_targets=("q_proj", "v_proj")))
    every = estimate(spec, hw, tier, Workload(method="lora"))
    assert qv.gpu["optimizer"] == pytest.approx(12 * spec.lora_params(8, ("q_proj", "v_proj")), rel=1e-6)
    assert qv.gpu["optimizer"] < every.gpu["optimizer"] / 4
    assert trainable_params(spec, Workload(method="lora", lora_targets=("q_proj", "v_proj"))) < \
        trainable_params(spec, Workload(method="lora"))


def test_every_tier_has_a_plan_entry():
    plan = plan_for("Qwen2.5-7B", "8x80G", "lora", 1024, 1)
    assert [t.tier.name for t in plan.tiers] == [t.name for t in TIERS]
