"""Model states per GPU: weights, gradients, optimizer states, ZeRO-3's gathered parameters.

Byte counts follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``
in ``deepspeed/runtime/zero/stage_1_and_2.py``, ``estimate_zero3_model_states_mem_needs``
in ``stage3.py``), split into named parts and applied to the *trainable* count only:
DeepSpeed keeps optimizer state for trainable parameters alone.

- 16-bit weights, 2 B/param: whole on every GPU at ZeRO-2, 1/N at ZeRO-3, none on
  the GPU when ZeRO-3 offloads parameters.  LLaMA-Factory upcasts trainable
  parameters to fp32 (``model/adapter.py``), but DeepSpeed's engine casts every
  parameter back to 16-bit (``_cast_module_mixed_precision`` in
  ``runtime/engine.py``); the fp32 copy is the optimizer's.
- Per trainable parameter, sharded 1/N: fp32 gradient 4 B + fp32 master 4 B + Adam
  m and v 8 B = 16 B.  ZeRO-2 adds a 16-bit gradient partition (2 B/N); ZeRO-3
  reduce-scatters 16-bit gradients straight into the fp32 partition.  With the
  16-bit weights that is DeepSpeed's 18 B/N at either stage.  Offloaded, all of it
  is in host RAM (see :mod:`dsplan.estimate.estimate`).
- ZeRO-3 gathers a module before using it: DeepSpeed charges 4 B x the largest
  layer (its 16-bit weight and gradient).  dsplan adds the gathered working set
  DeepSpeed keeps alive, capped by ``stage3_max_live_parameters``.
- LLaMA-Factory casts trainable parameters to fp32 on the GPU at load time unless
  ZeRO-3 is on (``cast_trainable_params_to_fp32``): full and freeze tuning at ZeRO-2
  briefly hold 4 B per trainable parameter.  Only the excess over the step's peak counts.
- The optimizer step: torch's AdamW (HF's default; dsplan writes no DeepSpeed
  optimizer block) with ``foreach`` makes a temporary as large as the fp32 partition
  it updates (ZeRO-3 steps ``sub_group_size`` elements at a time).  It comes after
  backward has freed activations and logits, so only its excess over them counts.
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

#: fp32 master weight and fp32 gradient per trainable parameter.
MASTER_AND_GRAD_BYTES = 8.0
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
    gpu[Component.GRADIENTS] = 2.0 * tp / n if tier.stage == 2 else 0.0
    state, paged = optimizer_state_bytes(w.optim)
    gpu[Component.OPTIMIZER] = (MASTER_AND_GRAD_BYTES + (0.0 if paged else state)) * tp / n
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


def optimizer_step_excess(tp: int, n: int, tier: Tier, zero: ZeroOptimization, freed: float) -> float:
    """What torch AdamW's fp32 temporary needs beyond the ``freed`` activations and logits."""
    if tier.offload_optimizer:
        return 0.0
    part = tp / n if tier.stage == 2 else min(tp / n, zero.sub_group_size)
    return max(0.0, 4.0 * part - freed)


def load_upcast_excess(spec: ModelSpec, tier: Tier, w: Workload, step_peak: float) -> float:
    """LLaMA-Factory's fp32 upcast at load (ZeRO-2, full/freeze) beyond the step's peak."""
    if tier.stage != 2 or w.method not in ("full", "freeze"):
        return 0.0
    load_peak = weight_bytes(spec, w) + 2.0 * trainable_params(spec, w)  # 4 B fp32 replaces 2 B
    return max(0.0, load_peak - step_peak)
