"""What is trained and how (:class:`Workload`), and the parameter counts and weight bytes that follow.

Pure arithmetic on :class:`ModelSpec` counts; no torch.

Quantized base weights, bytes per parameter of the decoder's linear layers
(embeddings, lm_head and norms stay 16-bit):

- bitsandbytes (LF's ``quantization_method: bnb``): 4-bit NF4 with double
  quantization stores 0.516 B (4 bits, one fp8 absmax per 64 weights, its fp32
  second-level scale); 8-bit stores 1.02 B.
- HQQ: ``bits/8`` plus an fp16 scale and zero per group of 64 (LF passes
  ``quant_zero=False, quant_scale=False``).  EETQ: int8 with a per-channel scale, ~1 B.
- LF 0.9.5 quantizes on the fly with those three only (``configure_quantization``);
  any other ``quantization_method`` loads the model unquantized.
- A pre-quantized checkpoint (``quantization_config`` in config.json) keeps its own
  bits: GPTQ/AWQ ``bits/8`` plus group scales (~0.03 B), AQLM 2 bits plus codebooks,
  bitsandbytes as above.  fp8 and mxfp4 checkpoints LF dequantizes at load: 16-bit.

Trainable parameters, as LLaMA-Factory sets them up (``model/adapter.py``):

- LoRA: rank x (in + out) per adapted linear; DoRA adds a magnitude vector (out) per
  adapted linear.  OFT: ``in x (block - 1) / 2`` per adapted linear (peft stores the
  upper triangle of each block).  ``additional_target`` (and, with ``resize_vocab``,
  the embeddings LF adds itself) trains a full copy of each named module.
- Freeze: |N| layers (N > 0 the last N, N < 0 the first -N), restricted to
  ``freeze_trainable_modules``, plus ``freeze_extra_modules``.
- rm and ppo train a value head (hidden + 1) on top (trl's ``ValueHead``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from dsplan.inputs.model import ModelSpec

#: Bytes per parameter of a quantized linear layer (bitsandbytes).
QUANT_BYTES = {4: 0.516, 8: 1.02}
#: HQQ: an fp16 scale and an fp16 zero per group of this many weights.
HQQ_GROUP = 64
#: Pre-quantized GPTQ/AWQ-style checkpoints: group scales and zeros, bytes per weight.
PTQ_GROUP_OVERHEAD = 0.03
#: Methods that train adapters on a frozen base.
ADAPTER_METHODS = ("lora", "qlora")
#: Stages whose batches hold a chosen and a rejected sequence per sample (LF's pairwise collator).
PAIRWISE_STAGES = ("rm", "dpo")
#: DPO losses that need no reference model (``FinetuningArguments.use_ref_model``).
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
#: Modules outside the decoder layers that ``additional_target``/``freeze_extra_modules`` may name.
OUTER_MODULES = ("embed_tokens", "lm_head", "norm")
#: Modules inside a decoder layer that ``freeze_trainable_modules`` may name.
LAYER_MODULES = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


@functools.lru_cache(maxsize=1)
def _installed_torch() -> str | None:
    """The installed torch's version from its metadata (torch itself is not imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def hf_default_optim(torch_version: str | None = None) -> str:
    """The ``optim`` HF's TrainingArguments defaults to with this torch: ``adamw_torch_fused`` from
    torch 2.8 (transformers >= 4.54, so every version LF 0.9.5 accepts), else ``adamw_torch``.  The
    version given, else the installed torch's; none installed (a login node): 2.8 or later, what
    LLaMA-Factory 0.9.5 installs today."""
    torch_version = torch_version or _installed_torch()
    if torch_version is None:
        return "adamw_torch_fused"
    parts = [int(p) for p in torch_version.split("+")[0].split(".")[:2] if p.isdigit()]
    return "adamw_torch_fused" if len(parts) == 2 and tuple(parts) >= (2, 8) else "adamw_torch"


@dataclass(frozen=True)
class Workload:
    """What is trained and how: everything the estimate depends on besides hardware and tier."""

    method: str = field(default="lora", metadata={"help": "lora, qlora, full, freeze"})
    cutoff_len: int = field(default=2048, metadata={"help": "tokens per sample"})
    data_len: int | None = field(default=None, metadata={
        "help": "the longest sequence the dataset forms, padded as LF's collator pads it (None: cutoff_len)"})
    micro_batch: int = field(default=1, metadata={"help": "samples per GPU per step"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "LF default: on"})
    attention: str = field(default="sdpa", metadata={"help": "sdpa, fa2 or eager"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    quantization_bit: int | None = field(default=None, metadata={"help": "4 or 8 (QLoRA), else None"})
    freeze_trainable_layers: int = field(default=2, metadata={"help": "LF freeze: N > 0 the last N layers train, "
                                                                      "N < 0 the first -N"})
    lora_targets: tuple[str, ...] | None = field(default=None, metadata={"help": "None = every linear (LF 'all')"})
    optim: str = field(default_factory=hf_default_optim, metadata={"help": "HF optim name (default: HF's for the "
                                                                           "installed torch)"})
    stage: str = field(default="sft", metadata={"help": "LF stage: pt, sft, rm, dpo, kto, ppo"})
    pref_loss: str = field(default="sigmoid", metadata={"help": "dpo: orpo and simpo need no reference"})
    ref_model: str | None = field(default=None, metadata={"help": "a reference model LF loads as a copy"})
    ref_quantization_bit: int | None = field(default=None, metadata={"help": "bits of a quantized reference"})
    reward_model_type: str = field(default="lora", metadata={"help": "ppo: lora (adapter), full (copy), api"})
    reward_quantization_bit: int | None = field(default=None, metadata={"help": "bits of a quantized reward model"})
    max_new_tokens: int = field(default=1024, metadata={"help": "ppo: tokens generated per response"})
    liger: bool = field(default=False, metadata={"help": "enable_liger_kernel"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA on top of LoRA"})
    adapter: str = field(default="lora", metadata={"help": "lora or oft"})
    oft_rank: int = field(default=0, metadata={"help": "OFT blocks per linear (0: from the block size)"})
    oft_block_size: int = field(default=32, metadata={"help": "OFT block size"})
    extra_modules: tuple[str, ...] = field(default=(), metadata={
        "help": "modules trained in full besides the method's own (additional_target, freeze_extra_modules)"})
    freeze_modules: tuple[str, ...] = field(default=("all",), metadata={"help": "freeze_trainable_modules"})
    quantization_method: str = field(default="bnb", metadata={"help": "LF's on-the-fly quantization library"})
    attention_mask_4d: bool = field(default=False, metadata={
        "help": "neat_packing without fa2: LF's collator builds a micro-batch x T x T mask"})
    image_max_pixels: int = field(default=768 * 768, metadata={"help": "multimodal: the largest image"})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "multimodal: vision tower frozen"})
    freeze_multi_modal_projector: bool = field(default=True, metadata={"help": "multimodal: projector frozen"})
    freeze_language_model: bool = field(default=False, metadata={"help": "multimodal: language model frozen"})
    adapter_fp32: bool = field(default=False, metadata={
        "help": "LoRA adapters held in fp32 (ZeRO-3): peft casts each adapted linear's input to fp32"})

    @property
    def sequences(self) -> int:
        """Sequences per sample in a batch: 2 for pairs (chosen and rejected, concatenated)."""
        return 2 if self.stage in PAIRWISE_STAGES else 1

    @property
    def seq_len(self) -> int:
        """Tokens of one trained sequence, every row of the worst micro-batch padded to it: the
        dataset's longest (``data_len``), else ``cutoff_len``; PPO adds its generated response."""
        padded = self.data_len if self.data_len is not None else self.cutoff_len
        return padded + (self.max_new_tokens if self.stage == "ppo" else 0)

    @property
    def tokens(self) -> int:
        """Tokens of the micro-batch's samples (pairs count once; see ``sequences``), PPO's prompts only."""
        return (self.data_len if self.data_len is not None else self.cutoff_len) * self.micro_batch

    @property
    def adapters(self) -> bool:
        return self.method in ADAPTER_METHODS

    @property
    def reference(self) -> str:
        """none, adapter (the base with adapters disabled: no copy) or copy (a second model)."""
        uses = (self.stage == "dpo" and self.pref_loss not in REFERENCE_FREE_LOSSES) or self.stage in ("kto", "ppo")
        if not uses:
            return "none"
        return "adapter" if self.adapters and not self.ref_model else "copy"

    @property
    def reward(self) -> str:
        """ppo's reward model: adapter (on the policy), copy, api; none for the other stages."""
        if self.stage != "ppo":
            return "none"
        return {"lora": "adapter", "full": "copy"}.get(self.reward_model_type, "api")


def adapted_linears(spec: ModelSpec, w: Workload) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count) of the linears the adapter wraps: ``lora_target`` (LF uses it for OFT
    too), ``all`` being every linear of the decoder; an unknown name is a user error."""
    if w.lora_targets:
        spec.lora_params(1, w.lora_targets)  # refuses module names the model does not have
        return [m for m in spec.linears() if m[0] in w.lora_targets]
    return spec.linears()


def adapter_params(spec: ModelSpec, w: Workload) -> int:
    """The adapter's own trainable parameters: LoRA (+ DoRA magnitudes) or OFT."""
    mods = adapted_linears(spec, w)
    if w.adapter == "oft":
        total = 0
        for _, a, _, count in mods:
            block = w.oft_block_size or (a // max(1, w.oft_rank))
            total += count * (a * (block - 1) // 2)
        return total
    lora = spec.lora_params(w.lora_rank, w.lora_targets) if w.lora_targets else spec.lora_params(w.lora_rank)
    if w.use_dora:
        lora += sum(b * count for _, _, b, count in mods)
    return lora


def module_params(spec: ModelSpec, name: str) -> int:
    """Parameters of one module outside the layers (0 when dsplan does not know the name)."""
    return {"embed_tokens": spec.embedding_params, "lm_head": spec.vocab_size * spec.hidden_size,
            "norm": spec.hidden_size}.get(name, 0)


def freeze_layer_params(spec: ModelSpec, modules: tuple[str, ...]) -> int:
    """Trainable parameters of one layer under ``freeze_trainable_modules``."""
    if "all" in modules or not modules:
        return spec.params_per_layer
    sizes = {"self_attn": spec.attn_params_per_layer, "mlp": spec.mlp_params_per_layer,
             "input_layernorm": spec.hidden_size, "post_attention_layernorm": spec.hidden_size}
    return sum(sizes.get(m, 0) for m in modules)


def trainable_params(spec: ModelSpec, w: Workload) -> int:
    """Parameters the optimizer updates: the adapters, |N| layers (freeze), or all; plus extra modules
    and a value head."""
    if w.adapters:
        n = adapter_params(spec, w) + sum(module_params(spec, m) for m in w.extra_modules)
    elif w.method == "freeze":  # LF: N > 0 trains the last N layers, N < 0 the first -N; as many either way
        layers = min(abs(w.freeze_trainable_layers), spec.num_layers)
        n = layers * freeze_layer_params(spec, w.freeze_modules) + sum(module_params(spec, m)
                                                                       for m in w.extra_modules)
    else:
        n = spec.total_params - frozen_multimodal_params(spec, w)
    if w.stage in ("rm", "ppo"):
        n += spec.hidden_size + 1  # trl's ValueHead: Linear(hidden, 1)
    return n


def frozen_multimodal_params(spec: ModelSpec, w: Workload) -> int:
    """What LF's full tuning of a VLM leaves frozen (``get_forbidden_modules``): the vision tower and
    the projector by default (``freeze_vision_tower``, ``freeze_multi_modal_projector``), the
    language model with ``freeze_language_model``.  The trace of Qwen2-VL's full tuning trains the
    text model alone; counting the tower as trainable put 43 % too much optimizer state on it."""
    v = getattr(spec, "vision", None)
    if v is None:
        return 0
    return ((v.tower_params if w.freeze_vision_tower else 0) + (v.projector_params if w.freeze_multi_modal_projector
                                                                else 0) + (spec.text_params if w.freeze_language_model
                                                                           else 0))


def saved_layers(spec: ModelSpec, w: Workload) -> int:
    """Decoder layers that keep activations for backward.  Freeze tuning of the last N layers
    (N > 0) with nothing trainable in front of them: no gradient flows into the frozen layers
    before, so autograd saves nothing there, and LF's checkpointing wraps only layers that train
    (``get_custom_gradient_checkpointing_func``); traced: Llama-3 with 1 of 2 layers trainable keeps
    one layer's activations.  Otherwise every layer."""
    if w.method == "freeze" and w.freeze_trainable_layers > 0 and "embed_tokens" not in w.extra_modules:
        return min(w.freeze_trainable_layers, spec.num_layers)
    return spec.num_layers


def linear_weight_bytes(spec: ModelSpec, w: Workload) -> float:
    """Bytes per parameter of the base model's linear layers as loaded."""
    ptq = pre_quantized(spec)
    if ptq is not None:
        return ptq[1]
    bits = w.quantization_bit if w.adapters else None
    if w.method == "qlora" and bits is None:
        bits = 4
    if bits is None:
        return 2.0
    if w.quantization_method == "hqq":
        return bits / 8 + 2 * 2.0 / HQQ_GROUP
    if w.quantization_method == "eetq":
        return 1.0
    if w.quantization_method == "bnb":
        return QUANT_BYTES.get(bits, 2.0)
    return 2.0  # LF 0.9.5 quantizes nothing on the fly with the other methods


def pre_quantized(spec: ModelSpec) -> tuple[str, float] | None:
    """(quant_method, bytes per linear weight) of a checkpoint that ships quantized (config.json's
    ``quantization_config``), or None; fp8 and mxfp4, which LF dequantizes at load, count as 16-bit."""
    cfg = getattr(spec, "quantization", None)
    if not isinstance(cfg, dict):
        return None
    method = str(cfg.get("quant_method", "")).lower()
    if method in ("fp8", "mxfp4"):
        return method, 2.0
    if method == "bitsandbytes":
        four = cfg.get("load_in_4bit") or cfg.get("_load_in_4bit")
        return method, QUANT_BYTES[4 if four else 8]
    bits = cfg.get("bits", cfg.get("w_bit", 2 if method == "aqlm" else 4))
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) or not 1 <= bits <= 16:
        bits = 4
    return method or "unknown", bits / 8 + PTQ_GROUP_OVERHEAD


def weight_bytes(spec: ModelSpec, w: Workload) -> float:
    """Bytes of the base model's weights as loaded (16-bit or quantized linears)."""
    per = linear_weight_bytes(spec, w)
    if per == 2.0:
        return 2.0 * spec.total_params
    lin = spec.linear_params
    return per * lin + 2.0 * (spec.total_params - lin)


def adapter_bytes(spec: ModelSpec, w: Workload) -> float:
    """The 16-bit adapter weights on top of the base (0 without adapters), with the full copies of
    the modules LF trains besides them and a value head."""
    return 2.0 * trainable_params(spec, w) if w.adapters else 0.0
