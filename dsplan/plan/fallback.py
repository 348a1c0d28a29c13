"""The fallback ladder: which tiers a run may fall back to, and the next step after an OOM.

Rules:
- The ladder goes fastest first and keeps a slower tier only if it saves at least
  :func:`min_saving` of GPU memory over the last tier kept, and only if the host can
  hold it.
- A run starts at the plan's choice (or a forced tier) and walks down from there;
  a start outside the ladder goes first, followed by the ladder tiers that need
  less GPU memory than it.
- After a GPU OOM the next tier must need less GPU memory; after a host OOM, no more
  host memory.  Below the last tier the micro-batch drops to the largest divisor of
  the effective batch that is at most half of it, and gradient accumulation rises
  so their product stays the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from dsplan.codes import Verdict
from dsplan.units import GiB

if TYPE_CHECKING:
    from dsplan.inputs.hardware import HardwareProfile
    from dsplan.plan.planner import Plan, TierPlan

#: A slower tier joins the ladder only if it saves this much GPU memory: the smaller of
#: an absolute amount and a fraction of the card.
MIN_SAVING_BYTES = 1 * GiB
MIN_SAVING_FRACTION = 0.05


def min_saving(profile: HardwareProfile) -> float:
    return min(MIN_SAVING_BYTES, MIN_SAVING_FRACTION * profile.gpu_mem)


def _prime_factors(n: int, into: dict[int, int]) -> None:
    """Add the prime factorisation of ``n`` >= 1 to ``into`` (prime -> exponent)."""
    d = 2
    while d * d <= n:
        while n % d == 0:
            into[d] = into.get(d, 0) + 1
            n //= d
        d += 1 if d == 2 else 2
    if n > 1:
        into[n] = into.get(n, 0) + 1


def divisors(n: int, *more: int) -> list[int]:
    """Divisors of ``n`` (times each of ``more``) >= 1, ascending.  Each factor is factorised
    on its own, so the cost is O(sqrt) of the largest factor, not of the product."""
    primes: dict[int, int] = {}
    for factor in (n, *more):
        _prime_factors(factor, primes)
    found = [1]
    for p, k in primes.items():
        found = [d * p**e for d in found for e in range(k + 1)]
    return sorted(found)


def divisors_desc(n: int) -> list[int]:
    return divisors(n)[::-1]


def build_ladder(plans: list[TierPlan], profile: HardwareProfile) -> list[str]:
    """Every tier worth falling back to, fastest first (see the module's rules)."""
    saving = min_saving(profile)
    ladder: list[TierPlan] = []
    for tp in sorted(plans, key=lambda p: p.tier.speed_rank):
        if not tp.fits_host:
            continue
        if not ladder or tp.estimate.gpu_bytes <= ladder[-1].estimate.gpu_bytes - saving:
            ladder.append(tp)
    return [tp.tier.name for tp in ladder]


def start_ladder(ladder: list[str], by_name: Mapping[str, TierPlan], start: str) -> list[str]:
    """``ladder`` from ``start`` down; a start outside it goes first, then the tiers that need less GPU memory."""
    if start in ladder:
        return ladder[ladder.index(start):]
    top = by_name[start].estimate.gpu_bytes
    return [start] + [n for n in ladder if by_name[n].estimate.gpu_bytes < top]


def ladder_from(plan: Plan, start: str) -> list[str]:
    """The plan's ladder from ``start`` down."""
    return start_ladder(plan.ladder, {t.tier.name: t for t in plan.tiers}, start)


def next_tier(plan: Plan, current: str, verdict: str) -> str | None:
    """Where to go after an OOM at ``current``: one step down the ladder, skipping tiers
    that do not reduce the memory that ran out."""
    cur = plan.get(current).estimate
    for name in ladder_from(plan, current)[1:]:
        est = plan.get(name).estimate
        if verdict == Verdict.GPU_OOM and est.gpu_bytes < cur.gpu_bytes:
            return name
        if verdict == Verdict.HOST_OOM and est.host_bytes <= cur.host_bytes:
            return name
    return None


def smaller_micro_batch(micro_batch: int, grad_accum: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation) with the micro-batch at most half as large and the same
    product, the micro-batch as large as that allows; None at micro-batch 1."""
    limit = micro_batch // 2
    if limit < 1:
        return None
    effective = micro_batch * grad_accum
    mb = max(d for d in divisors(micro_batch, grad_accum) if d <= limit)
    return mb, effective // mb


def next_step(plan: Plan, tier: str, micro_batch: int, grad_accum: int,
              verdict: str) -> tuple[str, int, int] | None:
    """The fallback after an OOM at (tier, micro_batch): the next tier down the ladder
    (at that tier's planned knobs, never a larger micro-batch), else the same tier with
    a smaller micro-batch (:func:`smaller_micro_batch`)."""
    nxt = next_tier(plan, tier, verdict)
    if nxt is not None:
        tp = plan.get(nxt)
        if tp.micro_batch <= micro_batch:
            return nxt, tp.micro_batch, tp.grad_accum
        return nxt, micro_batch, grad_accum
    smaller = smaller_micro_batch(micro_batch, grad_accum)
    return None if smaller is None else (tier, *smaller)
