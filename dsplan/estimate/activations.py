"""Activations, the loss's logits, and QLoRA's dequantization workspace, per GPU.

The per-token coefficients are fitted to exact traces of the real code path's state
(``scripts/trace_memory.py``: transformers' own modules and peft under ``FakeTensorMode``,
every live tensor storage tracked, 16-bit weights, LoRA adapters 16-bit at ZeRO-2 and fp32 at
ZeRO-3 as DeepSpeed leaves them, LF's checkpointing).  Per token, bf16/fp16 (h = hidden size,
q = heads x head_dim, kv = kv_heads x head_dim, i = MLP width), refitted on 7 Llama and 7 Qwen3
shapes (q from h/2 to 2h, kv from h/4 to h), within 0.6 % of each:

- a decoder layer of full tuning saves ``16.3 h + 8.14 q + 0.25 kv + 8.07 i`` bytes for backward
  (the norms' inputs, q and the key/value heads repeated to q's width for SDPA, the attention
  output, the MLP's intermediates); per-head q/k norms (Qwen3, Gemma 3) add ``6 q + 6 kv``.
  The former ``22.6 h + 8.46 i`` took q = kv = h, which undercounted Qwen3 (q = 2h) by 21 %.
- LoRA with 16-bit adapters (ZeRO-2) saves ``4 h`` less (the frozen norms need no saved output;
  ``2 q + 2 kv`` less with q/k norms), whatever the rank.  The former ``+16.3 h + 1.9 i`` was
  traced with peft's fp32 adapters, which DeepSpeed's ZeRO-2 engine casts to 16-bit: it
  overcounted LoRA without checkpointing by 44-55 %.  With fp32 adapters (ZeRO-3) peft casts each
  adapted linear's input to fp32 and autograd keeps the copies: ``10 h + 4 q`` for the
  attention's adapters, ``6 h + 2 i`` more when the MLP's linears are adapted (Llama-3-8B,
  Qwen2.5-0.5B and Qwen3-30B-A3B, whose fused experts LoRA does not wrap, within 0.4 %).
- MoE layers (first-principles terms below): the full tuning of Qwen3-30B-A3B, Qwen3-235B-A22B,
  Mixtral-8x7B and Qwen1.5-MoE traces within 2.2 %.  LoRA leaves fused experts frozen, so per
  routed copy of a token their gathered input and the down projection's input (2 h + 2 i, 16-bit)
  are not kept: those four within 4 % (it was up to +35 %).
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
from dsplan.estimate.workload import Workload, saved_layers

#: Saved bytes per token per layer of full tuning (bf16/fp16), per h, q, kv and i (module docstring).
ACT_H, ACT_Q, ACT_KV, ACT_I = 16.3, 8.14, 0.25, 8.07
#: Per-head q/k RMSNorm: more saved per q and per kv.
QK_NORM_Q, QK_NORM_KV = 6.0, 6.0
#: LoRA with 16-bit adapters, against full tuning: per h, and per q and kv with q/k norms.
LORA_ACT_H, LORA_QK_NORM = -4.0, -2.0
#: LoRA over fused (so frozen) routed experts: per routed copy of a token, the gathered 16-bit input and
#: the down projection's 16-bit input are kept only for the experts' weight gradients.
FROZEN_EXPERT_H, FROZEN_EXPERT_I = 2.0, 2.0
#: fp32 adapters (ZeRO-3): the adapters' fp32 input copies, attention (per h, q) and adapted MLP (per h, i).
LORA_FP32_ATTN_H, LORA_FP32_ATTN_Q, LORA_FP32_MLP_H, LORA_FP32_MLP_I = 10.0, 4.0, 6.0, 2.0
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
    transformers' expert loop, which the traces confirm for full tuning.  LoRA's fp32 input
    copies follow the MLP linears it wraps, which leaves out fused expert tensors."""
    moe_copy_h, router_bytes_per_expert = 4.0, 8.0
    h, i = spec.hidden_size, spec.mlp_width_per_token
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    b = ACT_H * h + ACT_Q * q + ACT_KV * kv + ACT_I * i
    if spec.qk_norm:
        b += QK_NORM_Q * q + QK_NORM_KV * kv
    if spec.moe is not None:
        b += spec.moe_layer_fraction * (moe_copy_h * spec.moe.top_k * h + router_bytes_per_expert * spec.moe.experts)
    if w.adapters:
        b += LORA_ACT_H * h + (LORA_QK_NORM * (q + kv) if spec.qk_norm else 0.0)
        if spec.moe is not None and spec.moe.fused:  # frozen experts: no input saved for their weights
            m = spec.moe
            b -= spec.moe_layer_fraction * m.top_k * (FROZEN_EXPERT_H * h + FROZEN_EXPERT_I * m.expert_width)
        if w.adapter_fp32:
            i_lora = spec.lora_mlp_width_per_token
            b += LORA_FP32_ATTN_H * h + LORA_FP32_ATTN_Q * q
            b += (LORA_FP32_MLP_H * h + LORA_FP32_MLP_I * i_lora) if i_lora else 0.0
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
    t, h, L = w.tokens, spec.hidden_size, saved_layers(spec, w)
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
