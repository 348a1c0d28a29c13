"""What is trained and how (:class:`Workload`), and the parameter counts and weight bytes that follow.

Pure arithmetic on :class:`ModelSpec` counts; no torch.

Quantized base weights (QLoRA, bitsandbytes): 4-bit NF4 with double quantization
stores 0.516 B per parameter of the decoder's linear layers (4 bits, plus one fp8
absmax per 64 weights, plus its fp32 second-level scale); 8-bit stores 1.02 B.
Embeddings, lm_head and norms stay 16-bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsplan.inputs.model import ModelSpec

#: Bytes per parameter of a quantized linear layer (bitsandbytes).
QUANT_BYTES = {4: 0.516, 8: 1.02}
#: Methods that train adapters on a frozen base.
ADAPTER_METHODS = ("lora", "qlora")


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
    freeze_trainable_layers: int = field(default=2, metadata={"help": "LF freeze: N > 0 the last N layers train, "
                                                                      "N < 0 the first -N"})
    lora_targets: tuple[str, ...] | None = field(default=None, metadata={"help": "None = every linear (LF 'all')"})
    optim: str = field(default="adamw_torch", metadata={"help": "HF optim name"})

    @property
    def tokens(self) -> int:
        return self.cutoff_len * self.micro_batch

    @property
    def adapters(self) -> bool:
        return self.method in ADAPTER_METHODS


def trainable_params(spec: ModelSpec, w: Workload) -> int:
    """Parameters the optimizer updates: the adapters, |N| layers (freeze), or all."""
    if w.adapters:
        return spec.lora_params(w.lora_rank, w.lora_targets) if w.lora_targets else spec.lora_params(w.lora_rank)
    if w.method == "freeze":  # LF: N > 0 trains the last N layers, N < 0 the first -N; as many either way
        return min(abs(w.freeze_trainable_layers), spec.num_layers) * spec.params_per_layer
    return spec.total_params


def weight_bytes(spec: ModelSpec, w: Workload) -> float:
    """Bytes of the base model's weights as loaded (16-bit or quantized linears)."""
    bits = w.quantization_bit if w.adapters else None
    if w.method == "qlora" and bits is None:
        bits = 4
    if bits in QUANT_BYTES:
        lin = spec.linear_params
        return QUANT_BYTES[bits] * lin + 2.0 * (spec.total_params - lin)
    return 2.0 * spec.total_params


def adapter_bytes(spec: ModelSpec, w: Workload) -> float:
    """The 16-bit adapter weights on top of the base (0 without adapters)."""
    return 2.0 * trainable_params(spec, w) if w.adapters else 0.0
