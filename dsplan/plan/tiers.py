"""The four DeepSpeed tiers: the single source of truth for their names, aliases and order.

A tier is a ZeRO stage plus where the optimizer (and, at stage 3, the parameters)
live.  ``TIERS`` lists them fastest first; that order is only the *speed* order.
The fallback ladder for a given model/method/world size is built by the planner
from memory estimates, not from this list.
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
