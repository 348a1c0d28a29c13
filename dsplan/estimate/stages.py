"""The transient memory of one training step, phase by phase, for every LLaMA-Factory stage.

A step passes through phases whose transient tensors (activations, logits, extra
forwards, generation) do not coexist; :func:`step_transients` returns the parts of
the phase with the largest sum.  For pt and sft without Liger, DoRA or neat packing
the phases are exactly :func:`~dsplan.estimate.activations.activation_bytes`'s.
Per stage, from LF 0.9.5's code (bytes per token per vocabulary entry are written
``x tV``; t counts every sequence of the micro-batch):

- **pairs** (rm, dpo/orpo/simpo): ``PairwiseDataCollatorWithPadding`` concatenates the
  chosen and rejected sequences, so a micro-batch of b samples is 2b sequences.
- **rm** (``train/rm/trainer.py``): trl's value-head model returns the 16-bit logits
  upcast to fp32, which the loss never uses: 2 + 4 = 6 x tV at the end of forward,
  nothing in backward.
- **dpo** (``train/dpo/trainer.py``): ``concatenated_forward`` keeps the policy's fp32
  logits (their chosen/rejected views live on) and log-softmax saves its fp32 output:
  8 x tV are held while the reference runs its no-grad forward, which makes another
  8 x tV (fp32 logits, log-softmax) plus one layer's live intermediates (``ref_forward``).
  orpo and simpo run no reference.  Backward peaks at the usual 12 x tV.
- **kto** (``train/kto/trainer.py``): after the policy's forward, a no-grad forward over
  the KL batch (same size) makes 8 x tV while the policy holds 8 (``kl_forward``); the
  reference then runs both of its forwards without grad, 12 x tV at their peak (its
  target logits wait while the KL forward runs) while the policy holds its saved
  log-softmax and the boolean-indexed chosen/rejected copies, 8 x tV (``ref_forward``).
- **ppo** (``train/ppo/trainer.py``, trl's ``PPOTrainer``): the trained sequence is the
  prompt (up to cutoff_len) plus the response (up to max_new_tokens).  Generation
  holds the KV cache, 2 x layers x kv_heads x head_dim x 2 B per token of prompt and
  response (``kv_cache``); at ZeRO-3 trl's ``unwrap_model_for_generation`` gathers
  every parameter of the policy on each GPU (``generation_gather``).  The reference's
  no-grad forward (16-bit and fp32 logits, log-softmax: 10 x tV) has no saved
  activations beside it.

Knobs:

- ``enable_liger_kernel`` for pt/sft on a model type LF patches: the fused linear
  cross-entropy (Liger's ``fused_linear_cross_entropy_forward``) computes the loss
  and its gradients chunk by chunk in the forward pass: the 16-bit input gradient
  (t x hidden), one chunk of 16-bit logits (``next_pow2(t / ceil(V / hidden))`` rows)
  and, when lm_head trains, its 16-bit weight gradient.  No full logits.  Other stages
  need the logits (LF passes ``require_logits``), so Liger changes nothing there.
- ``use_dora`` (peft's ``DoraLinearLayer``): per adapted linear and token, the base and
  LoRA outputs saved for the magnitude's product (2 x out x 2 B); while a layer runs,
  an identity of in x in, B@A and W + B@A (``dora_workspace``, the largest linear).
- ``neat_packing`` without fa2: the collator's 4D mask, micro-batch x T x T in the
  compute dtype, rides along the whole step (``attention_mask``).
"""

from __future__ import annotations

import math
from dataclasses import replace

from dsplan.codes import Component
from dsplan.estimate.activations import (GC_HEAD_H, GC_KEEP_H, GC_RECOMPUTE_FACTOR, TIED_HEAD_GRAD_BYTES,
                                         layer_act_bytes_per_token, logits_bytes)
from dsplan.estimate.workload import Workload, adapted_linears, adapter_bytes, saved_layers, weight_bytes
from dsplan.inputs.hardware import HardwareProfile
from dsplan.inputs.model import ModelSpec
from dsplan.plan.tiers import Tier
from dsplan.schema.lf_names import LIGER_MODEL_TYPES

#: rm: the value-head model's 16-bit logits and their fp32 upcast, x tV, forward only.
RM_LOGITS_BYTES = 6.0
#: dpo/kto: what the policy holds while another forward runs (fp32 logits or copies, saved log-softmax), x tV.
POLICY_HELD_BYTES = 8.0
#: A no-grad forward's own fp32 logits and log-softmax, x tV.
NO_GRAD_FORWARD_BYTES = 8.0
#: kto's reference: its target logits wait while its KL forward makes its own, x tV.
KTO_REF_FORWARD_BYTES = 12.0
#: ppo's reference forward: 16-bit logits, their fp32 upcast and the log-softmax, x tV.
PPO_REF_FORWARD_BYTES = 10.0
#: One decoder layer of a no-grad forward, per token: nothing is saved, so what lives at once is the
#: MLP's gate and up outputs and their product (3 x i x 2 B) and four hidden-wide 16-bit tensors
#: (residual, normed input, attention output, the layer's output).
NO_GRAD_LAYER_I, NO_GRAD_LAYER_H = 6.0, 8.0
#: DoRA: bytes saved per output feature of an adapted linear per token (base and LoRA outputs, 16-bit).
DORA_SAVED_BYTES = 4.0
#: 16-bit elements: the compute dtype of activations, KV cache and masks.
HALF = 2.0

Phase = dict[Component, float]


def trained_batch(w: Workload) -> Workload:
    """The workload as the model sees it: every sequence of the micro-batch, each seq_len long
    (its ``cutoff_len`` is that length, so its ``seq_len`` and ``tokens`` are the batch's)."""
    if w.sequences == 1 and w.seq_len == w.cutoff_len and w.data_len is None:
        return w
    return replace(w, cutoff_len=w.seq_len, data_len=None, max_new_tokens=0,
                   micro_batch=w.micro_batch * w.sequences)


def liger_fused(spec: ModelSpec, w: Workload) -> bool:
    """Whether LF applies Liger's fused linear cross-entropy (pt/sft, a model type it patches)."""
    return w.liger and w.stage in ("pt", "sft") and spec.model_type in LIGER_MODEL_TYPES


def liger_loss_bytes(spec: ModelSpec, w: Workload) -> float:
    """Liger's chunked loss: input gradient, one chunk of logits, the lm_head gradient if it trains."""
    t, v, h = w.tokens, spec.vocab_size, spec.hidden_size
    chunk = min(t, 2 ** math.ceil(math.log2(max(1, math.ceil(t / math.ceil(v / h))))))
    b = HALF * t * h + HALF * chunk * v
    if w.method == "full":
        b += HALF * v * h
    return b


def loss_bytes(spec: ModelSpec, w: Workload) -> float:
    """The loss's memory at its peak for this stage (``w`` is the trained batch)."""
    if liger_fused(spec, w):
        return liger_loss_bytes(spec, w)
    if w.stage == "rm":
        return RM_LOGITS_BYTES * w.tokens * spec.vocab_size
    return logits_bytes(spec, w)


def dora_saved_per_token(spec: ModelSpec, w: Workload) -> float:
    """DoRA's extra saved bytes per token in one layer, on average over the layers (0 without DoRA).
    Routed experts count once per expert a token runs through, like the MLP's activations."""
    if not (w.use_dora and w.adapters):
        return 0.0
    moe = getattr(spec, "moe", None)
    per_expert = len(moe.layers) * moe.experts if moe is not None and not moe.fused else None
    outs = 0.0
    for _, _, b, count in adapted_linears(spec, w):
        # a routed expert's linear runs for the top-k share of the tokens only
        outs += b * (count * moe.top_k / moe.experts if count == per_expert else count)
    return DORA_SAVED_BYTES * outs / spec.num_layers


def always_there(spec: ModelSpec, w: Workload) -> Phase:
    """Transients present in every phase of the step: the 4D mask, DoRA's workspace."""
    parts: Phase = {}
    if w.attention_mask_4d:
        parts[Component.ATTENTION_MASK] = HALF * w.micro_batch * w.seq_len ** 2
    if w.use_dora and w.adapters:
        parts[Component.DORA_WORKSPACE] = max(HALF * (a * a + 2 * a * b) for _, a, b, _ in adapted_linears(spec, w))
    return parts


def held_at_loss(spec: ModelSpec, w: Workload) -> float:
    """Activations alive when forward ends (``w`` is the trained batch)."""
    t, h, L = w.tokens, spec.hidden_size, saved_layers(spec, w)
    if not w.gradient_checkpointing:
        return L * (layer_act_bytes_per_token(spec, w) + dora_saved_per_token(spec, w)) * t
    return L * GC_KEEP_H * h * t + GC_HEAD_H * h * t


def training_phases(spec: ModelSpec, w: Workload) -> list[Phase]:
    """Forward-and-backward phases of the trained batch ``w``: at the loss, recomputing a layer
    (checkpointing), the tied embedding's gradient (full tuning)."""
    t, h, L = w.tokens, spec.hidden_size, saved_layers(spec, w)
    per_layer = (layer_act_bytes_per_token(spec, w) + dora_saved_per_token(spec, w)) * t
    phases = [{Component.ACTIVATIONS: held_at_loss(spec, w), Component.LOGITS: loss_bytes(spec, w)}]
    if w.gradient_checkpointing:
        kept = L * GC_KEEP_H * h * t
        phases.append({Component.ACTIVATIONS: kept + GC_RECOMPUTE_FACTOR * per_layer, Component.LOGITS: 0.0})
    if w.method == "full" and spec.tie_word_embeddings:
        phases.append({Component.ACTIVATIONS: 0.0, Component.LOGITS: TIED_HEAD_GRAD_BYTES * spec.vocab_size * h})
    return phases


def extra_forward_phases(spec: ModelSpec, w: Workload) -> list[Phase]:
    """The no-grad forwards of dpo (reference), kto (KL batch, reference) and ppo (reference)."""
    tv = w.tokens * spec.vocab_size
    width = getattr(spec, "mlp_width_per_token", spec.intermediate_size)  # MoE: the experts a token runs
    layer = (NO_GRAD_LAYER_I * width + NO_GRAD_LAYER_H * spec.hidden_size) * w.tokens
    held = {Component.ACTIVATIONS: held_at_loss(spec, w), Component.LOGITS: POLICY_HELD_BYTES * tv}
    phases = []
    if w.stage == "dpo" and w.reference != "none":
        phases.append({**held, Component.REF_FORWARD: NO_GRAD_FORWARD_BYTES * tv + layer})
    if w.stage == "kto":
        phases.append({**held, Component.KL_FORWARD: NO_GRAD_FORWARD_BYTES * tv + layer})
        phases.append({**held, Component.REF_FORWARD: KTO_REF_FORWARD_BYTES * tv + layer})
    if w.stage == "ppo":
        phases.append({Component.ACTIVATIONS: 0.0, Component.LOGITS: 0.0,
                       Component.REF_FORWARD: PPO_REF_FORWARD_BYTES * tv + layer})
    return phases


def generation_phase(spec: ModelSpec, hw: HardwareProfile, tier: Tier, w: Workload) -> Phase:
    """ppo's generation: the KV cache and, at ZeRO-3, the whole policy gathered on each GPU."""
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * HALF * w.micro_batch * w.seq_len
    phase = {Component.ACTIVATIONS: 0.0, Component.LOGITS: 0.0, Component.KV_CACHE: kv}
    if tier.stage == 3:
        whole = weight_bytes(spec, w) + adapter_bytes(spec, w)
        resident = 0.0 if tier.offload_param else whole / hw.world_size
        phase[Component.GENERATION_GATHER] = whole - resident
    return phase


def step_transients(spec: ModelSpec, hw: HardwareProfile, tier: Tier, w: Workload) -> Phase:
    """The transient parts of the step's peak phase; activations and logits are always named."""
    wt = trained_batch(w)
    if tier.stage == 3 and w.adapters and not w.adapter_fp32:  # traced: ZeRO-3 keeps peft's adapters in fp32
        wt = replace(wt, adapter_fp32=True)
    phases = training_phases(spec, wt) + extra_forward_phases(spec, wt)
    if w.stage == "ppo":
        phases.append(generation_phase(spec, hw, tier, w))
    extra = always_there(spec, wt)
    peak = max(({**p, **extra} for p in phases), key=lambda p: sum(p.values()))
    return {k: v for k, v in peak.items() if v or k in (Component.ACTIVATIONS, Component.LOGITS)}
