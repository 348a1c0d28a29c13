"""The four DeepSpeed tiers: the single source of truth for their names, aliases and order.

A tier is a ZeRO stage plus where the optimizer (and, at stage 3, the parameters)
live.  ``TIERS`` lists them fastest first; that order is only the *speed* order.
The fallback ladder for a given model/method/world size is built by the planner
from memory estimates, not from this list.  :func:`lf_refusal` says which tiers
LLaMA-Factory itself refuses for a config; those never join a ladder.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsplan.errors import UserError
from dsplan.schema.ds import DsConfig


@dataclass(frozen=True)
class Tier:
    name: str
    stage: int  # ZeRO stage
    offload_optimizer: bool  # optimizer states (and the fp32 master copy) in host RAM
    offload_param: bool  # ZeRO-3 only: 16-bit parameters in host RAM between uses
    speed_rank: int  # 1 = fastest
    summary: str

    @property
    def offloads(self) -> bool:
        return self.offload_optimizer or self.offload_param


TIERS: tuple[Tier, ...] = (
    Tier("zero2", 2, False, False, 1, "ZeRO-2: optimizer states and gradients sharded, weights replicated"),
    Tier("zero2_offload", 2, True, False, 2, "ZeRO-2 + CPU offload of optimizer states and fp32 master weights"),
    Tier("zero3", 3, False, False, 3, "ZeRO-3: weights, gradients and optimizer states all sharded"),
    Tier("zero3_offload", 3, True, True, 4, "ZeRO-3 + CPU offload of optimizer states and parameters"),
)
TIER_NAMES = tuple(t.name for t in TIERS)

#: Other names people use.  ``minimal`` is dsplan's own; ``deepspeed``,
#: ``stage2_offload`` and ``stage3`` are the names seed 004's run_train.sh uses.
ALIASES = {
    "minimal": "zero3_offload",
    "deepspeed": "zero2",
    "stage2": "zero2",
    "stage2_offload": "zero2_offload",
    "stage3": "zero3",
    "stage3_offload": "zero3_offload",
    "z2": "zero2",
    "z2_offload": "zero2_offload",
    "z3": "zero3",
    "z3_offload": "zero3_offload",
}

_BY_NAME = {t.name: t for t in TIERS}


def get_tier(name: str) -> Tier:
    """Resolve a tier name or alias; raise UserError for anything else."""
    key = (name or "").strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in _BY_NAME:
        choices = ", ".join(TIER_NAMES + tuple(ALIASES))
        raise UserError(f"unknown tier {name!r}: choose one of {choices}, or 'all'")
    return _BY_NAME[key]


def select_tiers(name: str | None) -> tuple[Tier, ...]:
    """``None``/``all`` -> every tier; otherwise the one named."""
    if name is None or name.strip().lower() == "all":
        return TIERS
    return (get_tier(name),)


@dataclass(frozen=True)
class TierConfig:
    """Everything one tier renders with: the tier, its batch knobs, its DeepSpeed config and notes."""

    tier: Tier
    micro_batch: int
    grad_accum: int
    ds: DsConfig
    notes: tuple[str, ...] = ()
    refused: str | None = None  # LLaMA-Factory's reason for refusing this tier, if it does


# ---------------------------------------------------------------- LLaMA-Factory's refusals
#: ZeRO stages each rule refuses, with LF 0.9.5's (or transformers') own message.  The checks
#: live in ``hparams/parser.py`` (``get_train_args``), ``model/model_utils/quantization.py``
#: (``configure_quantization``, at model load), ``model/adapter.py`` and transformers'
#: ``trainer_optimizer.py``.  LF always trains DeepSpeed distributed (torchrun).
ALL_STAGES = (2, 3)


def _lf_tier_rules(s, spec) -> list[tuple[bool, tuple[int, ...], str]]:
    """(applies, refused ZeRO stages, message) for the merged settings ``s`` and model ``spec``."""
    from dsplan.estimate.workload import pre_quantized

    ptq = pre_quantized(spec)
    qbit = s.quantization_bit if ptq is None else None
    layerwise = s.optim.endswith("_layerwise")
    return [
        (s.use_galore or s.use_apollo, ALL_STAGES, "GaLore and APOLLO are incompatible with DeepSpeed yet."),
        (s.use_badam and s.badam_mode == "ratio", ALL_STAGES,
         "Radio-based BAdam does not yet support distributed training, use layer-wise BAdam."),
        (s.use_badam and s.badam_mode == "layer", (2,), "Layer-wise BAdam only supports DeepSpeed ZeRO-3 training."),
        (layerwise, ALL_STAGES, f"Layer-wise {s.optim} does not support DDP at this time"),
        (s.use_unsloth, (3,), "Unsloth is incompatible with DeepSpeed ZeRO-3."),
        (s.use_kt, (3,), "KTransformers is incompatible with DeepSpeed ZeRO-3."),
        (s.predict_with_generate, (3,), "`predict_with_generate` is incompatible with DeepSpeed ZeRO-3."),
        (s.pissa_init, (3,), "Please use scripts/pissa_init.py to initialize PiSSA in DeepSpeed ZeRO-3."),
        *_on_the_fly_rules(qbit, s.quantization_method, ""),
        *[rule for bits, which in _quantized_companions(s)
          for rule in _on_the_fly_rules(bits, s.quantization_method, f"{which}, loaded {bits}-bit")],
        (ptq is not None and ptq[0] not in ("fp8", "mxfp4"), (3,),
         "DeepSpeed ZeRO-3 or FSDP is incompatible with PTQ-quantized models."),
        (bool(s.adapter_name_or_path) and "," in s.adapter_name_or_path, (3,),
         "Cannot use multiple adapters in DeepSpeed ZeRO-3."),
    ]


def _on_the_fly_rules(bits, method: str, which: str) -> list[tuple[bool, tuple[int, ...], str]]:
    """``configure_quantization``'s ZeRO-3 rules for a model LF loads with ``quantization_bit=bits`` (and
    ``quantization_method``); ``which`` names a model besides the one trained, in the message."""
    on, also = bits is not None, f" ({which})" if which else ""
    return [
        (on and method == "bnb" and bits != 4, (3,),
         f"Only 4-bit quantized model can use fsdp+qlora or auto device map.{also}"),
        (on and method == "hqq", (3,), f"HQQ quantization is incompatible with DeepSpeed ZeRO-3 or FSDP.{also}"),
        (on and method == "eetq", (3,), f"EETQ quantization is incompatible with DeepSpeed ZeRO-3 or FSDP.{also}"),
    ]


def _quantized_companions(s) -> list[tuple[int, str]]:
    """(bits, which) of each reference or reward model LF loads quantized beside the trained one
    (``create_ref_model``/``create_reward_model`` copy the trained model's arguments, quantization_method
    included, with ``ref_model_quantization_bit``/``reward_model_quantization_bit``)."""
    from dsplan.estimate.workload import REFERENCE_FREE_LOSSES

    uses_ref = (s.stage == "dpo" and s.pref_loss not in REFERENCE_FREE_LOSSES) or s.stage in ("kto", "ppo")
    out = []
    if uses_ref and s.ref_model and s.ref_model_quantization_bit is not None:
        out.append((s.ref_model_quantization_bit, "the reference model"))
    if s.stage == "ppo" and s.reward_model_type == "full" and s.reward_model_quantization_bit is not None:
        out.append((s.reward_model_quantization_bit, "the reward model"))
    return out


def lf_refusal(tier: Tier, settings, spec) -> str | None:
    """LLaMA-Factory's message if it refuses ``tier`` for these settings and this model, else None."""
    reasons = [msg for applies, stages, msg in _lf_tier_rules(settings, spec) if applies and tier.stage in stages]
    return " ".join(m if m.endswith(".") else f"{m}." for m in reasons) or None
