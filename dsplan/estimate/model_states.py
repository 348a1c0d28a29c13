"""Model states per GPU: weights, gradients, optimizer states, ZeRO-3's gathered parameters.

Byte counts follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``
in ``deepspeed/runtime/zero/stage_1_and_2.py``, ``estimate_zero3_model_states_mem_needs``
in ``stage3.py``), split into named parts and applied to the *trainable* count only:
DeepSpeed keeps optimizer state for trainable parameters alone.

- 16-bit weights, 2 B/param: whole on every GPU at ZeRO-2, 1/N at ZeRO-3, none on
  the GPU when ZeRO-3 offloads parameters.  LLaMA-Factory upcasts trainable
  parameters to fp32 (``model/adapter.py``), but at ZeRO-2 DeepSpeed's engine casts every
  parameter back to 16-bit (``_cast_module_mixed_precision`` in
  ``runtime/engine.py``), LoRA adapters included; at ZeRO-3 peft's adapters stay fp32 (LF
  does not cast them there and zero.Init keeps them so): 4 B per adapter parameter.
- Per trainable parameter, sharded 1/N, as the real path measured it (one DeepSpeed step,
  every tensor storage tracked; ``scripts/trace_memory.py facts``): the fp32 master 4 B and
  Adam's m and v 8 B persist (``optimizer``); a 16-bit gradient partition, 2 B/N
  (``gradients``), is made in backward at ZeRO-2 and kept from init at ZeRO-3.  The fp32
  gradient exists only inside the step (below), not beside the activations.  ZeRO-2's
  partition is counted beside the loss's peak too, where it does not exist yet: an
  overestimate of up to 2 B/N per trainable parameter for full tuning (+8.5 % at worst in
  the trace table).  Offloaded, all of it is in host RAM (see :mod:`dsplan.estimate.estimate`).
- ZeRO-3 gathers a module before using it: DeepSpeed charges 4 B x the largest
  layer (its 16-bit weight and gradient).  dsplan adds the gathered working set
  DeepSpeed keeps alive, capped by ``stage3_max_live_parameters``.
- LLaMA-Factory casts trainable parameters to fp32 on the GPU at load time unless
  ZeRO-3 is on (``cast_trainable_params_to_fp32``): full and freeze tuning at ZeRO-2
  briefly hold 4 B per trainable parameter.  Only the excess over the step's peak counts.
- The optimizer step (``step`` in ``stage_1_and_2.py``, ``_prepare_fp32_grad_for_sub_group``
  in ``stage3.py``): DeepSpeed flattens the 16-bit gradient partition (a 2 B copy) and upcasts
  it to the fp32 gradient (4 B), per ``sub_group_size`` elements at ZeRO-3, then runs the
  torch optimizer HF built (dsplan writes no DeepSpeed optimizer block).  HF's default
  ``optim`` is ``adamw_torch_fused`` when torch >= 2.8 (transformers >= 4.54, all that LF
  0.9.5 accepts; :func:`~dsplan.estimate.workload.hf_default_optim`): one fused kernel, no
  temporary.  ``adamw_torch`` (foreach) adds a 4 B temporary beside the fp32 gradient once the
  copy is gone, which raises the step only at ZeRO-3 (ZeRO-2 has freed its partition by then).
  Measured above the persistent states at the step: 8 B/N at ZeRO-2 (the 2 B partition, the
  copy, the fp32 gradient), 6 B/N at ZeRO-3.  It comes after backward has freed activations
  and logits, so only its excess over them counts.
  Under offload accelerate swaps in DeepSpeed's CPU Adam, which makes none on the GPU.
- Optimizer states per HF ``optim`` (:data:`OPTIMIZER_STATES`); the ones dsplan does not
  model (GaLore, APOLLO, LOMO, schedule-free, ...) count as AdamW's.
- A reference or reward model LF loads beside the policy (:func:`side_model_states`):
  16-bit (or bitsandbytes-quantized) weights, placed as trl's ``prepare_deepspeed``
  places them: sharded at ZeRO-3, whole at lower stages, whole when quantized.
"""

from __future__ import annotations

from dsplan.codes import Component, HostComponent
from dsplan.inputs.hardware import HardwareProfile
from dsplan.inputs.model import ModelSpec
from dsplan.estimate.workload import (QUANT_BYTES, Workload, adapter_bytes, adapter_params, trainable_params,
                                      weight_bytes)
from dsplan.plan.tiers import Tier
from dsplan.schema.ds import ZeroOptimization

#: fp32 master weight per trainable parameter (the fp32 gradient lives only in the step).
MASTER_BYTES = 4.0
#: The 16-bit gradient partition per trainable parameter (ZeRO-2: made in backward; ZeRO-3: at init).
GRAD_PARTITION_BYTES = 2.0
#: The step's own tensors per parameter of the partition it updates: the flattened 16-bit copy
#: of the gradient partition and its fp32 upcast.
STEP_COPY_BYTES = 6.0
#: The fp32 gradient the step hands the optimizer, per parameter.
FP32_GRAD_BYTES = 4.0
#: foreach AdamW's temporary (``torch._foreach_sqrt`` of v) per parameter; fused kernels make none.
FOREACH_TEMP_BYTES = 4.0
#: HF optimizers that run as one fused kernel.
FUSED_OPTIMIZERS = ("adamw_torch_fused", "adamw_apex_fused", "adamw_torch_npu_fused")
#: ZeRO-3's gather of the largest layer: its 16-bit weight and gradient.
GATHER_BYTES = 4.0
#: DeepSpeed's estimators add 50 % to offloaded bytes for pinned buffers.
HOST_PINNED_FACTOR = 1.5


#: Optimizer state bytes per trainable parameter for each HF ``optim`` (paged ones start with
#: "paged_").  fp32 Adam keeps m and v (8 B); bitsandbytes' 8-bit states are 1 B each plus block
#: scales (Adam ~2 B); torchao's 4-bit ~1 B; Lion one state, AdEMAMix three, RMSprop and Adagrad
#: one; SGD (no momentum by default) and Adafactor (factored, no first moment) ~0.
OPTIMIZER_STATES: dict[str, float] = {
    "adamw_torch": 8.0, "adamw_torch_fused": 8.0, "adamw_torch_xla": 8.0, "adamw_torch_npu_fused": 8.0,
    "adamw_apex_fused": 8.0, "adamw_anyprecision": 8.0, "stable_adamw": 8.0, "adafactor": 0.0,
    "adamw_torch_4bit": 1.0, "adamw_torch_8bit": 2.0, "ademamix": 12.0, "sgd": 0.0, "adagrad": 4.0,
    "adamw_bnb_8bit": 2.0, "adamw_8bit": 2.0, "ademamix_8bit": 3.0, "lion_8bit": 1.0, "lion_32bit": 4.0,
    "paged_adamw_32bit": 8.0, "paged_adamw_8bit": 2.0, "paged_ademamix_32bit": 12.0, "paged_ademamix_8bit": 3.0,
    "paged_lion_32bit": 4.0, "paged_lion_8bit": 1.0, "rmsprop": 4.0, "rmsprop_bnb": 4.0, "rmsprop_bnb_8bit": 1.0,
    "rmsprop_bnb_32bit": 4.0,
}
#: Optimizers whose states dsplan does not model: counted as fp32 AdamW's (8-bit: as 8-bit Adam's).
APPROXIMATED_OPTIMIZERS = ("galore_", "apollo_", "lomo", "adalomo", "grokadamw", "schedule_free_")


def optimizer_state_bytes(optim: str) -> tuple[float, bool]:
    """(bytes of optimizer state per parameter, paged?) for an HF ``optim`` name.  Paged variants
    keep their states in unified memory that is evicted to host RAM under pressure, so dsplan
    counts them on the host."""
    name = optim.lower()
    state = OPTIMIZER_STATES.get(name)
    if state is None:  # approximated (see APPROXIMATED_OPTIMIZERS)
        state = 2.0 if "8bit" in name else 8.0
    return state, name.startswith("paged")


def model_states(spec: ModelSpec, hw: HardwareProfile, tier: Tier, w: Workload,
                 zero: ZeroOptimization) -> tuple[dict[Component, float], dict[HostComponent, float]]:
    """(per-GPU, per-node host) bytes of weights, gradients and optimizer states."""
    n = hw.world_size
    tp = trainable_params(spec, w)
    weights = weight_bytes(spec, w) + adapter_bytes(spec, w)
    if tier.stage == 3 and w.adapters:  # traced: ZeRO-3 keeps peft's adapters in fp32 (ZeRO-2 casts them to 16-bit)
        weights += 2.0 * adapter_params(spec, w)
    gpu: dict[Component, float] = {}
    host: dict[HostComponent, float] = {}
    if tier.stage == 3:
        gpu[Component.WEIGHTS] = 0.0 if tier.offload_param else weights / n
        gpu[Component.ZERO3_GATHER] = GATHER_BYTES * spec.largest_layer_params
        gpu[Component.ZERO3_LIVE] = 2.0 * min(zero.stage3_max_live_parameters, spec.total_params)
    else:
        gpu[Component.WEIGHTS] = weights
    if tier.offload_optimizer:
        gpu[Component.GRADIENTS] = 0.0
        gpu[Component.OPTIMIZER] = 0.0
        return gpu, host
    gpu[Component.GRADIENTS] = GRAD_PARTITION_BYTES * tp / n
    state, paged = optimizer_state_bytes(w.optim)
    gpu[Component.OPTIMIZER] = (MASTER_BYTES + (0.0 if paged else state)) * tp / n
    if paged:
        host[HostComponent.PAGED_OPTIMIZER] = state * tp * hw.gpus_per_node / n
    return gpu, host


def _copy_bytes(spec: ModelSpec, bits: int | None) -> float:
    """A second model as loaded: 16-bit, or bitsandbytes-quantized linears."""
    if bits in QUANT_BYTES:
        return QUANT_BYTES[bits] * spec.linear_params + 2.0 * (spec.total_params - spec.linear_params)
    return 2.0 * spec.total_params


def _placed(nbytes: float, hw: HardwareProfile, tier: Tier, quantized: bool) -> tuple[float, float]:
    """(per GPU, per node on the host) of a model DeepSpeed prepares for inference beside the policy:
    trl's ``prepare_deepspeed`` shards it at ZeRO-3 (offloading its parameters with the policy's)
    and runs it at stage 0 otherwise, whole on every GPU; a quantized one it leaves whole."""
    if quantized or tier.stage != 3:
        return nbytes, 0.0
    if tier.offload_param:
        return 0.0, HOST_PINNED_FACTOR * nbytes / hw.nodes
    return nbytes / hw.world_size, 0.0


def side_model_states(spec: ModelSpec, hw: HardwareProfile, tier: Tier,
                      w: Workload) -> tuple[dict[Component, float], float]:
    """(per-GPU parts, host bytes per node of offloaded parameters) of the reference and reward
    models LF loads beside the policy (``create_ref_model``/``create_reward_model`` in
    ``train/trainer_utils.py``).  A copy is assumed the policy's size."""
    gpu: dict[Component, float] = {}
    host = 0.0
    if w.reference == "copy":
        bits = w.ref_quantization_bit if w.ref_model else None
        on_gpu, off = _placed(_copy_bytes(spec, bits), hw, tier, bits is not None)
        gpu[Component.REF_MODEL], host = on_gpu, host + off
    if w.reward == "copy":
        bits = w.reward_quantization_bit
        on_gpu, off = _placed(_copy_bytes(spec, bits), hw, tier, bits is not None)
        gpu[Component.REWARD_MODEL], host = on_gpu, host + off
    elif w.reward == "adapter":  # a second adapter on the policy, assumed of the policy's rank
        on_gpu, off = _placed(2.0 * adapter_params(spec, w), hw, tier, False)
        gpu[Component.REWARD_MODEL], host = on_gpu, host + off
    return gpu, host


def optimizer_step_excess(tp: int, n: int, tier: Tier, zero: ZeroOptimization, freed: float,
                          optim: str = "adamw_torch") -> float:
    """What the step's gradient copies (and a foreach optimizer's temporary) need beyond the ``freed``
    activations and logits."""
    if tier.offload_optimizer:
        return 0.0
    part = tp / n if tier.stage == 2 else min(tp / n, zero.sub_group_size)
    temp = 0.0 if optim.lower() in FUSED_OPTIMIZERS else FOREACH_TEMP_BYTES
    # the copy (16-bit flat + fp32), then the optimizer (fp32 gradient + its temporary), by when ZeRO-2
    # has freed its 16-bit partition (counted in ``gradients``); ZeRO-3 keeps its partition
    per = max(STEP_COPY_BYTES, FP32_GRAD_BYTES + temp - (GRAD_PARTITION_BYTES if tier.stage == 2 else 0.0))
    return max(0.0, per * part - freed)


def load_upcast_excess(spec: ModelSpec, tier: Tier, w: Workload, step_peak: float) -> float:
    """LLaMA-Factory's fp32 upcast at load (ZeRO-2, full/freeze) beyond the step's peak."""
    if tier.stage != 2 or w.method not in ("full", "freeze"):
        return 0.0
    load_peak = weight_bytes(spec, w) + 2.0 * trainable_params(spec, w)  # 4 B fp32 replaces 2 B
    return max(0.0, load_peak - step_peak)
