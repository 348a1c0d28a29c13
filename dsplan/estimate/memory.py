"""Memory model: peak bytes per GPU and per host node, as a sum of named components.

Third stage of the data flow (hardware profile -> model spec -> **memory estimate**
-> plan).  Pure arithmetic on counts from :class:`ModelSpec`; no torch.

Where each term comes from
--------------------------
Model states (weights, gradients, optimizer) follow the byte counts of DeepSpeed's
own estimators (``estimate_zero2_model_states_mem_needs`` in
``deepspeed/runtime/zero/stage_1_and_2.py``, ``estimate_zero3_model_states_mem_needs``
in ``stage3.py``), split into named parts and applied to the *trainable* count
only, since DeepSpeed keeps optimizer state for trainable parameters alone:

- 16-bit weights: 2 B/param, replicated at ZeRO-2, sharded 1/N at ZeRO-3, on the
  host when ZeRO-3 offloads parameters.  LLaMA-Factory upcasts trainable
  parameters to fp32 (``model/adapter.py``), but DeepSpeed's engine casts every
  parameter back to 16-bit (``_cast_module_mixed_precision`` in
  ``runtime/engine.py``); the fp32 copy lives in the optimizer.
- fp32 gradients 4 B, fp32 master weights 4 B, Adam m and v 8 B: 16 B per
  trainable parameter, sharded 1/N; ZeRO-2 also keeps a 16-bit gradient partition
  (2 B/N).  That is DeepSpeed's 18 B/N at ZeRO-2 and its 18 B/N at ZeRO-3 with the
  16-bit weight partition.  With the optimizer offloaded all of it lives in host
  RAM, where DeepSpeed's estimators add 50 % for pinned buffers (we keep that).
  DeepSpeed's ZeRO-2 host formula also charges every rank an fp32 copy of the
  whole model at start-up; LLaMA-Factory loads 16-bit weights straight to the GPU,
  so dsplan charges the 16-bit checkpoint once per node instead.
- ZeRO-3 gathers each module before use: DeepSpeed counts 4 B x the largest
  layer (its 16-bit weight and gradient).

Where dsplan adds to DeepSpeed's model-state numbers (each a separate component):
- ``load_upcast``: LLaMA-Factory casts trainable parameters to fp32 on the GPU at
  load time unless ZeRO-3 is on (``cast_trainable_params_to_fp32``), so full and
  freeze tuning at ZeRO-2 briefly need 4 B per trainable parameter.  Only the
  excess over the training-step peak is counted.
- ``zero3_live``: the gathered working set DeepSpeed keeps alive, capped by
  ``stage3_max_live_parameters``.
- quantized weights (QLoRA): 4-bit NF4 with double quantization is 0.516 B per
  parameter of the decoder's linear layers (4 bits + a 1/64 fp8 absmax + its fp32
  second-level scale); 8-bit is 1.02 B; embeddings, lm_head and norms stay 16-bit.

Activations and logits are fitted to exact traces of real HF models (Llama-3,
Qwen1.5, Qwen2.5 shapes) taken with PyTorch's ``MemTracker`` under
``FakeTensorMode``; ``scripts/trace_memory.py`` re-runs them and prints estimate
vs trace.  Per token, bf16/fp16:

- each decoder layer keeps ``22.6 h + 8.46 i`` bytes for backward (h = hidden,
  i = MLP width; q/k/v after RoPE, the SDPA output, norm inputs, MLP
  intermediates).  LoRA adds ``16.3 h + 1.9 i`` (peft's separate base and
  adapter branches), nearly independent of the rank.
- eager attention also keeps the score matrix: ``6 x heads x T^2`` bytes per
  layer (bf16 scores and the fp32 softmax) less ``2.3 h`` per token; SDPA and
  FlashAttention keep none of it.
- with gradient checkpointing (LLaMA-Factory's default, reentrant) each layer
  keeps only its 16-bit input (``2 h``); one layer is recomputed at a time.
- the loss: transformers' ``ForCausalLMLoss`` upcasts logits to fp32
  (``logits.float()``) and cross-entropy keeps an fp32 log-softmax, then backward
  adds an fp32 gradient: 12 bytes x tokens x vocab at the peak (4 + 4 + 4; the
  16-bit logits are freed once copied, as the Trainer drops the model output).
  This is seed 002's "Tried to allocate 2.32 GiB": 4096 tokens x 151936 x 4.
  With full tuning and an untied lm_head, its weight gradient (2 B x vocab x
  hidden) coexists with 2.3 B x tokens x vocab of it; with tied embeddings the
  embedding's backward at the very end holds ~6 B x vocab x hidden.

The optimizer step: torch's AdamW (HF's default optimizer; dsplan writes no DeepSpeed
optimizer block) with ``foreach`` makes a temporary as large as the fp32 partition it
updates; it exists after backward, so only its excess over activations + logits
counts (``optimizer_step``).  DeepSpeed's CPU Adam under offload makes none on the GPU.

DeepSpeed buffers: the ZeRO-2 reduce bucket (``reduce_bucket_size``, HF sets it to
h^2) and allgather bucket (``allgather_bucket_size``); ZeRO-3's prefetch bucket
(0.9 h^2) and reduce bucket.  Runtime overhead: the CUDA/HIP context, NCCL/RCCL
buffers, and allocator slack as a fraction of the memory that comes and goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsplan.inputs.hardware import HardwareProfile
from dsplan.inputs.model import ModelSpec
from dsplan.plan.tiers import Tier
from dsplan.units import GiB

# ----------------------------------------------------------------- constants
#: Bytes per parameter of a quantized linear layer (bitsandbytes).
QUANT_BYTES = {4: 0.516, 8: 1.02}
#: Activation bytes per token per layer (bf16/fp16), fitted to MemTracker traces.
ACT_H, ACT_I = 22.6, 8.46
LORA_ACT_H, LORA_ACT_I = 16.3, 1.9
EAGER_SCORE_BYTES, EAGER_LESS_H = 6.0, 2.3
#: With gradient checkpointing: per layer input kept; per token at the loss.
GC_KEEP_H, GC_HEAD_H = 2.0, 8.5
#: fp32 loss memory per token per vocab entry at the peak.
LOGITS_BYTES = 12.0
LOGITS_WITH_HEAD_GRAD_BYTES = 2.3
#: Full tuning, tied embeddings: the embedding backward at the very end holds ~6 B x vocab x hidden.
TIED_HEAD_GRAD_BYTES = 6.0
#: GPU runtime: context + libraries (cuBLAS/hipBLAS workspaces), per backend.
CONTEXT_BYTES = {"cuda": int(0.75 * GiB), "rocm": int(1.0 * GiB), "dcu": int(1.0 * GiB)}
NCCL_BYTES = int(0.5 * GiB)
#: Allocator slack as a fraction of transient memory: PyTorch's caching allocator keeps
#: what it reserved at each phase's peak, and ZeRO-3's gather/release of differently
#: sized parameters fragments it further.  Not measurable on this project's CPU CI;
#: set so LLaMA-Factory issue 5977's measured ~13 GB (ZeRO-3 + offload) is not
#: underestimated by more than ~20 %.
SLACK = {2: 0.15, 3: 0.50}
#: Adam's m and v per trainable parameter: fp32 (8 B), or bitsandbytes' 8-bit states
#: (1 B each plus block scales, ~2 B).  Paged variants keep them in unified memory
#: that is evicted to host RAM under pressure, so dsplan counts them on the host.
def optimizer_state_bytes(optim: str) -> tuple[float, bool]:
    """(bytes of m+v per parameter, paged?) for an HF ``optim`` name."""
    name = optim.lower()
    eight_bit = "8bit" in name or ("bnb" in name and "32bit" not in name)
    return (2.0 if eight_bit else 8.0), name.startswith("paged")


#: DeepSpeed's default ZeRO-3 sub_group_size (elements per optimizer step).
SUB_GROUP_SIZE = 1_000_000_000
#: Host: per rank process baseline (Python, torch, CUDA libs, dataloader workers).
HOST_PER_RANK = int(3.0 * GiB)
#: Host: DeepSpeed's own estimator adds 50 % to offloaded states for pinned buffers.
HOST_OFFLOAD_FACTOR = 1.5


@dataclass(frozen=True)
class Workload:
    """What is trained and how: everything the estimate depends on besides hardware and tier."""

    method: str = field(default="lora", metadata={"help": "lora, qlora, full, freeze"})
    cutoff_len: int = field(default=2048, metadata={"help": "tokens per sample"})
    micro_batch: int = field(default=1, metadata={"help": "samples per GPU per step"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "LF default: on"})
    attention: str = field(default="sdpa", metadata={"help": "sdpa, fa2 or eager"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    quantization_bit: int | None = field(default=None, metadata={"help": "4 or 8 (QLoRA), else None"})
    freeze_trainable_layers: int = field(default=2, metadata={"help": "LF freeze: last N layers train"})
    lora_targets: tuple[str, ...] | None = field(default=None, metadata={"help": "None = every linear (LF 'all')"})
    optim: str = field(default="adamw_torch", metadata={"help": "HF optim name"})

    @property
    def tokens(self) -> int:
        return self.cutoff_len * self.micro_batch


@dataclass(frozen=True)
class DsBuffers:
    """The DeepSpeed numbers that size its buffers (elements, not bytes)."""

    allgather_bucket_size: int = 500_000_000
    max_live_parameters: int = 1_000_000_000
    reduce_bucket_size: int | None = None  # None = "auto" = hidden^2, as HF fills it


@dataclass
class Estimate:
    """Peak bytes for one tier: per GPU and per host node, each as named parts."""

    tier: str
    gpu: dict[str, int]
    host: dict[str, int]

    @property
    def gpu_bytes(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


# ----------------------------------------------------------------- counts
def trainable_params(spec: ModelSpec, w: Workload) -> int:
    if w.method in ("lora", "qlora"):
        return spec.lora_params(w.lora_rank, w.lora_targets) if w.lora_targets else spec.lora_params(w.lora_rank)
    if w.method == "freeze":
        return min(w.freeze_trainable_layers, spec.num_layers) * spec.params_per_layer
    return spec.total_params


def weight_bytes(spec: ModelSpec, w: Workload) -> float:
    """Bytes of the base model's weights as loaded (16-bit or quantized linears)."""
    bits = w.quantization_bit if w.method in ("lora", "qlora") else None
    if w.method == "qlora" and bits is None:
        bits = 4
    if bits in QUANT_BYTES:
        lin = spec.linear_params
        return QUANT_BYTES[bits] * lin + 2.0 * (spec.total_params - lin)
    return 2.0 * spec.total_params


# ----------------------------------------------------------------- activations
def layer_act_bytes_per_token(spec: ModelSpec, w: Workload) -> float:
    """Saved activations of one decoder layer per token, without checkpointing."""
    h, i = spec.hidden_size, spec.intermediate_size * max(1, min(spec.num_experts, 2))
    b = ACT_H * h + ACT_I * i
    if w.method in ("lora", "qlora"):
        b += LORA_ACT_H * h + LORA_ACT_I * i
    if w.attention == "eager":
        b += EAGER_SCORE_BYTES * spec.num_heads * w.cutoff_len - EAGER_LESS_H * h
    return b


def logits_bytes(spec: ModelSpec, w: Workload) -> float:
    """fp32 loss memory at its peak, with the lm_head gradient when it is trained and untied."""
    t, v = w.tokens, spec.vocab_size
    loss_peak = LOGITS_BYTES * t * v
    if w.method == "full" and not spec.tie_word_embeddings:
        loss_peak = max(loss_peak, LOGITS_WITH_HEAD_GRAD_BYTES * t * v + 2.0 * v * spec.hidden_size)
    return loss_peak


def activation_bytes(spec: ModelSpec, w: Workload) -> tuple[float, float]:
    """(activations, logits) in the phase of the step where their sum peaks."""
    t, h, L = w.tokens, spec.hidden_size, spec.num_layers
    per_layer = layer_act_bytes_per_token(spec, w) * t
    logits = logits_bytes(spec, w)
    if not w.gradient_checkpointing:
        phases = [(L * per_layer, logits)]
    else:
        kept = L * GC_KEEP_H * h * t
        # At the loss: every layer's checkpointed input, the final norm/head inputs, the
        # logits.  Later, while recomputing one layer in backward: that layer's
        # activations and their gradients.
        phases = [(kept + GC_HEAD_H * h * t, logits), (kept + 1.5 * per_layer, 0.0)]
    if w.method == "full" and spec.tie_word_embeddings:
        # The shared embedding's gradient at the end of backward, activations gone.
        phases.append((0.0, TIED_HEAD_GRAD_BYTES * spec.vocab_size * h))
    return max(phases, key=lambda p: p[0] + p[1])


def trace_layout_estimate(spec: ModelSpec, *, method: str, gradient_checkpointing: bool, seq_len: int,
                          micro_batch: int, attention: str = "sdpa", lora_rank: int = 8) -> dict:
    """Prediction for ``scripts/trace_memory.py``'s layout: one device, no DeepSpeed, every
    parameter bf16, torch AdamW (states in the parameter dtype)."""
    w = Workload(method=method, cutoff_len=seq_len, micro_batch=micro_batch,
                 gradient_checkpointing=gradient_checkpointing, attention=attention, lora_rank=lora_rank)
    act, logits = activation_bytes(spec, w)
    tp = trainable_params(spec, w)
    params = 2.0 * spec.total_params + (2.0 * tp if method in ("lora", "qlora") else 0.0)
    adam = 4.0 * tp  # m and v in bf16
    # torch AdamW (foreach=False) makes two temporaries the size of the parameter it updates.
    if method == "full":
        largest = spec.largest_layer_params
    else:  # the largest LoRA matrix: rank x the widest side of a targeted linear
        largest = lora_rank * max(max(a, b) for a, b in spec.linear_shapes().values())
    step = 2.0 * tp + 2 * 2.0 * largest
    # Peak: at the loss (activations + logits, no gradients yet: zero_grad sets them to None)
    # or in the optimizer step (all gradients and states plus its temporaries, activations gone).
    total = params + adam + max(act + logits, step)
    return {"act": act + logits, "total": total}


# ----------------------------------------------------------------- the estimate
def estimate(spec: ModelSpec, hw: HardwareProfile, tier: Tier, w: Workload,
             ds: DsBuffers = DsBuffers()) -> Estimate:
    """Peak memory of one training step (and model load) for this tier."""
    n = hw.world_size
    P = spec.total_params
    tp = trainable_params(spec, w)
    h = spec.hidden_size
    wbytes = weight_bytes(spec, w)
    adapters = 2.0 * tp if w.method in ("lora", "qlora") else 0.0  # 16-bit adapter weights

    gpu: dict[str, float] = {}
    host: dict[str, float] = {}
    # -- model states ------------------------------------------------------
    if tier.stage == 3:
        gpu["weights"] = 0.0 if tier.offload_param else (wbytes + adapters) / n
        gpu["zero3_gather"] = 4.0 * spec.largest_layer_params
        gpu["zero3_live"] = 2.0 * min(ds.max_live_parameters, P)
    else:
        gpu["weights"] = wbytes + adapters
    if tier.offload_optimizer:
        gpu["gradients"] = 0.0
        gpu["optimizer"] = 0.0
    else:
        # ZeRO-2 keeps a 16-bit gradient partition; ZeRO-3 reduce-scatters 16-bit
        # gradients straight into the fp32 partition (DeepSpeed's estimators count the
        # same: 18 B/param at ZeRO-2 besides the weights, 16 B at ZeRO-3).
        gpu["gradients"] = 2.0 * tp / n if tier.stage == 2 else 0.0
        state, paged = optimizer_state_bytes(w.optim)
        gpu["optimizer"] = (8.0 + (0.0 if paged else state)) * tp / n  # fp32 grads + master (+ m, v)
        if paged:
            host["paged_optimizer"] = state * tp * hw.gpus_per_node / n

    # -- activations and loss ---------------------------------------------
    act, logits = activation_bytes(spec, w)
    gpu["activations"] = act
    gpu["logits"] = logits
    if w.method == "qlora" or w.quantization_bit:
        # bitsandbytes dequantizes one weight at a time to 16-bit for the matmul.
        gpu["dequant_workspace"] = 2.0 * max(a * b for a, b in spec.linear_shapes().values())
    if not tier.offload_optimizer:
        # torch AdamW (HF's default, foreach on GPU) makes an fp32 temporary of the flat
        # partition it steps (ZeRO-3 steps sub-groups of sub_group_size).  It comes after
        # backward, when activations and logits are freed: count only what exceeds them.
        part = tp / n if tier.stage == 2 else min(tp / n, SUB_GROUP_SIZE)
        excess = 4.0 * part - (act + logits)
        if excess > 0:
            gpu["optimizer_step"] = excess

    # -- DeepSpeed buffers --------------------------------------------------
    reduce_elems = ds.reduce_bucket_size or h * h
    buffers = 2.0 * reduce_elems
    if tier.stage == 2:
        buffers += 2.0 * min(ds.allgather_bucket_size, tp)
    else:
        buffers += 2.0 * 0.9 * h * h  # prefetch bucket
    gpu["ds_buffers"] = buffers

    # -- load-time peak (LF's fp32 upcast without ZeRO-3) -------------------
    if tier.stage == 2 and w.method in ("full", "freeze"):
        load_peak = wbytes + 2.0 * tp  # fp32 copy of trainable params (4 B) replaces their 2 B
        step_peak = sum(gpu.values())
        if load_peak > step_peak:
            gpu["load_upcast"] = load_peak - step_peak

    # -- overhead -------------------------------------------------------------
    transient = act + logits + buffers + gpu.get("zero3_gather", 0.0) + gpu.get("zero3_live", 0.0)
    overhead = CONTEXT_BYTES[hw.backend] + (NCCL_BYTES if n > 1 else 0) + SLACK[tier.stage] * transient
    gpu["overhead"] = overhead

    # -- host, per node -----------------------------------------------------
    nodes = hw.nodes
    per_node = hw.gpus_per_node
    host["processes"] = HOST_PER_RANK * per_node
    host["checkpoint_cache"] = 2.0 * P  # the 16-bit checkpoint read once into the page cache
    if tier.offload_optimizer:
        host["optimizer_offload"] = HOST_OFFLOAD_FACTOR * 16.0 * tp / nodes
    if tier.offload_param:
        host["param_offload"] = HOST_OFFLOAD_FACTOR * (wbytes + adapters) / nodes
    return Estimate(tier=tier.name, gpu={k: int(v) for k, v in gpu.items()},
                    host={k: int(v) for k, v in host.items()})
