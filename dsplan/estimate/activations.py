"""Activations, the loss's logits, and QLoRA's dequantization workspace, per GPU.

The per-token coefficients are fitted to exact traces of real HF models (Llama-3,
Qwen1.5 and Qwen2.5 shapes) taken with PyTorch's ``MemTracker`` under
``FakeTensorMode``; ``scripts/trace_memory.py`` re-runs the traces and prints
estimate against trace, and :func:`trace_layout_estimate` is its prediction.
Per token, bf16/fp16 (h = hidden size, i = MLP width):

- a decoder layer saves ``22.6 h + 8.46 i`` bytes for backward (q/k/v after RoPE,
  the SDPA output, the norms' inputs, the MLP's intermediates).  LoRA adds
  ``16.3 h + 1.9 i`` (peft runs base and adapter as separate branches), almost
  independent of the rank.
- eager attention also saves the score matrix, ``6 x heads x T^2`` bytes per layer
  (bf16 scores and their fp32 softmax), less ``2.3 h`` per token; SDPA and
  FlashAttention save none of it.
- with gradient checkpointing (LLaMA-Factory's default, reentrant) a layer keeps
  only its 16-bit input (``2 h``), and backward recomputes one layer at a time.
- the loss: transformers' ``ForCausalLMLoss`` casts the logits to fp32
  (``logits.float()``), cross-entropy keeps an fp32 log-softmax, and backward adds
  an fp32 gradient: 4 + 4 + 4 = 12 B per token per vocabulary entry at the peak
  (the 16-bit logits go once copied: the Trainer drops the model output).  Seed
  002's "Tried to allocate 2.32 GiB" is one of these three: 4096 tokens x 151936 x 4.
  Full tuning with an untied lm_head: its 16-bit weight gradient (2 B x vocab x
  hidden) coexists with 2.3 B per token per vocabulary entry of the loss.  With tied
  embeddings the embedding's backward at the very end holds ~6 B x vocab x hidden.
"""

from __future__ import annotations

from dsplan.inputs.model import ModelSpec
from dsplan.estimate.workload import Workload, trainable_params

#: Saved bytes per token per layer (bf16/fp16), fitted to MemTracker traces.
ACT_H, ACT_I = 22.6, 8.46
LORA_ACT_H, LORA_ACT_I = 16.3, 1.9
EAGER_SCORE_BYTES, EAGER_LESS_H = 6.0, 2.3
#: With gradient checkpointing: per layer, the input kept; per token, the final norm/head inputs.
GC_KEEP_H, GC_HEAD_H = 2.0, 8.5
#: While recomputing one layer in backward: its activations and their gradients.
GC_RECOMPUTE_FACTOR = 1.5
#: fp32 loss bytes per token per vocabulary entry at the peak: upcast logits, log-softmax, gradient.
LOGITS_BYTES = 12.0
LOGITS_WITH_HEAD_GRAD_BYTES = 2.3
#: Full tuning, tied embeddings: the embedding's backward at the very end, x vocab x hidden.
TIED_HEAD_GRAD_BYTES = 6.0


def layer_act_bytes_per_token(spec: ModelSpec, w: Workload) -> float:
    """Saved activations of one decoder layer per token, without checkpointing (the mean over
    the layers where dense and MoE layers differ).

    The MLP term uses the width a token really runs through: in an MoE layer its top-k routed
    experts plus any shared expert (:attr:`ModelSpec.mlp_width_per_token`), not the dense
    width.  MoE layers also keep, per routed copy of a token, its gathered 16-bit input and its
    output before the routing weight is applied (2 x 2 B x hidden), and the router's fp32
    probabilities and top-k weights (~8 B per expert): first-principles figures from
    transformers' expert loop, not fitted to traces.  LoRA's extra saved inputs follow the MLP
    linears it wraps, which leaves out fused expert tensors."""
    moe_copy_h, router_bytes_per_expert = 4.0, 8.0
    h, i = spec.hidden_size, spec.mlp_width_per_token
    b = ACT_H * h + ACT_I * i
    if spec.moe is not None:
        b += spec.moe_layer_fraction * (moe_copy_h * spec.moe.top_k * h + router_bytes_per_expert * spec.moe.experts)
    if w.adapters:
        b += LORA_ACT_H * h + LORA_ACT_I * spec.lora_mlp_width_per_token
    if w.attention == "eager":
        b += EAGER_SCORE_BYTES * spec.num_heads * w.seq_len - EAGER_LESS_H * h
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
        # At the loss: every layer's checkpointed input, the final norm/head inputs and the
        # logits.  Later, recomputing one layer in backward: that layer's activations.
        phases = [(kept + GC_HEAD_H * h * t, logits), (kept + GC_RECOMPUTE_FACTOR * per_layer, 0.0)]
    if w.method == "full" and spec.tie_word_embeddings:
        # The shared embedding's gradient at the end of backward, activations gone.
        phases.append((0.0, TIED_HEAD_GRAD_BYTES * spec.vocab_size * h))
    return max(phases, key=lambda p: p[0] + p[1])


def dequant_workspace_bytes(spec: ModelSpec, w: Workload) -> float:
    """bitsandbytes dequantizes one weight at a time to 16-bit for its matmul (0 unquantized)."""
    if w.method == "qlora" or w.quantization_bit:
        return 2.0 * max(a * b for a, b in spec.linear_shapes().values())
    return 0.0


def trace_layout_estimate(spec: ModelSpec, *, method: str, gradient_checkpointing: bool, seq_len: int,
                          micro_batch: int, attention: str = "sdpa", lora_rank: int = 8) -> dict:
    """Prediction for ``scripts/trace_memory.py``'s layout: one device, no DeepSpeed, every
    parameter bf16, torch AdamW (states in the parameter dtype)."""
    w = Workload(method=method, cutoff_len=seq_len, micro_batch=micro_batch,
                 gradient_checkpointing=gradient_checkpointing, attention=attention, lora_rank=lora_rank)
    act, logits = activation_bytes(spec, w)
    tp = trainable_params(spec, w)
    params = 2.0 * spec.total_params + (2.0 * tp if w.adapters else 0.0)
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
