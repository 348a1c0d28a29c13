"""Planner: estimate every tier, build this run's fallback ladder, pick the fastest tier that fits.

Fourth stage of the data flow.  ``plan``, ``render`` and ``run`` all call
:func:`make_plan`; the ladder it returns is the one ``run`` walks down on OOM.

Rules, in one place:
- A tier *fits* when its GPU estimate is within the card's memory less the headroom,
  and (for offload tiers) its host estimate is within the node's RAM less the
  headroom.  Unknown host RAM is assumed to fit, with a note.
- The ladder starts at the chosen tier, goes fastest first, and keeps a slower tier only if it saves at least
  ``min(1 GiB, 5 % of the card)`` of GPU memory over the last tier kept, and only
  if the host can hold it.  So LoRA's ZeRO-2 + offload (it offloads adapters'
  optimizer states only) and ZeRO-3 on one GPU (gathering costs more than it
  shards) drop out, while a model larger than one card keeps its ZeRO-3 tiers.
- The choice is the first ladder tier that fits at the requested micro-batch.  If
  none does, micro-batch goes down through its divisors and gradient accumulation
  up, so micro-batch x accumulation stays the same.
- ``run`` falls back along the ladder; below its last tier it halves the micro-batch
  (raising accumulation to keep the product) down to 1: activations and logits
  are what the estimate is least sure of, and both shrink with the micro-batch.
- Degrading the run itself (a shorter ``cutoff_len``, 4-bit QLoRA) happens only
  when the user allows it (``allow_cutoff``, ``allow_qlora``), never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dsplan.inputs.hardware import HardwareProfile
from dsplan.estimate.memory import DsBuffers, Estimate, Workload, estimate
from dsplan.inputs.model import ModelSpec
from dsplan.inputs.settings import TrainSettings
from dsplan.plan.tiers import TIERS, DsKnobs, Tier, TierConfig, get_tier
from dsplan.units import GiB

DEFAULT_HEADROOM = 0.05
#: ZeRO-3 "lean" knobs the planner may use when the defaults do not fit.
LEAN_MAX_LIVE = 300_000_000


@dataclass
class TierPlan:
    """One tier, estimated at the knobs the planner would use for it."""

    tier: Tier
    estimate: Estimate
    micro_batch: int
    grad_accum: int
    fits_gpu: bool
    fits_host: bool
    ds: DsKnobs = field(default_factory=DsKnobs)
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def tier_config(self) -> TierConfig:
        return TierConfig(self.tier, self.micro_batch, self.grad_accum, self.ds, self.notes)


@dataclass
class Plan:
    profile: HardwareProfile
    model: ModelSpec
    settings: TrainSettings
    workload: Workload
    headroom: float
    tiers: list[TierPlan]  # all four, in TIERS order
    ladder: list[str]  # fallback order, fastest first
    choice: str | None
    why: list[str]
    degraded: list[str] = field(default_factory=list)

    def get(self, name: str) -> TierPlan:
        return next(t for t in self.tiers if t.tier.name == name)

    @property
    def chosen(self) -> TierPlan | None:
        return self.get(self.choice) if self.choice else None

    def ladder_from(self, start: str) -> list[str]:
        """The ladder from ``start`` down; a start outside the ladder goes first."""
        if start in self.ladder:
            return self.ladder[self.ladder.index(start):]
        below = [n for n in self.ladder if self.get(n).estimate.gpu_bytes < self.get(start).estimate.gpu_bytes]
        return [start] + below

    def next_tier(self, current: str, verdict: str) -> str | None:
        """Where to go after an OOM at ``current``: one step down the ladder, skipping tiers
        that do not reduce the memory that ran out."""
        order = self.ladder_from(current)
        cur = self.get(current).estimate
        for name in order[1:]:
            est = self.get(name).estimate
            if verdict == "gpu_oom" and est.gpu_bytes < cur.gpu_bytes:
                return name
            if verdict == "host_oom" and est.host_bytes <= cur.host_bytes:
                return name
        return None

    def next_step(self, tier: str, micro_batch: int, grad_accum: int, verdict: str) -> tuple[str, int, int] | None:
        """The fallback after an OOM at (tier, micro_batch): the next tier down the ladder
        (at that tier's planned knobs, never a larger micro-batch), else the same tier with
        micro-batch halved and gradient accumulation raised so their product stays."""
        nxt = self.next_tier(tier, verdict)
        if nxt is not None:
            tp = self.get(nxt)
            if tp.micro_batch <= micro_batch:
                return nxt, tp.micro_batch, tp.grad_accum
            return nxt, micro_batch, grad_accum
        effective = micro_batch * grad_accum
        smaller = [d for d in range(micro_batch // 2, 0, -1) if effective % d == 0]
        if not smaller:
            return None
        return tier, smaller[0], effective // smaller[0]

    def to_dict(self) -> dict:
        return {
            "choice": self.choice,
            "ladder": list(self.ladder),
            "headroom": self.headroom,
            "gpu_bytes_available": self.usable_gpu,
            "host_bytes_available": self.usable_host,
            "why": list(self.why),
            "degraded": list(self.degraded),
            "hardware": self.profile.to_dict(),
            "model": self.model.to_dict(),
            "workload": self.workload.__dict__.copy(),
            "tiers": [
                {
                    "tier": t.tier.name,
                    "fits": t.fits,
                    "fits_gpu": t.fits_gpu,
                    "fits_host": t.fits_host,
                    "in_ladder": t.tier.name in self.ladder,
                    "speed_rank": t.tier.speed_rank,
                    "gpu_bytes": t.estimate.gpu_bytes,
                    "host_bytes": t.estimate.host_bytes,
                    "micro_batch": t.micro_batch,
                    "grad_accum": t.grad_accum,
                    "breakdown": dict(t.estimate.gpu),
                    "host_breakdown": dict(t.estimate.host),
                    "notes": list(t.notes),
                }
                for t in self.tiers
            ],
        }

    @property
    def usable_gpu(self) -> int:
        return int(self.profile.gpu_mem * (1 - self.headroom))

    @property
    def usable_host(self) -> int | None:
        return int(self.profile.host_ram * (1 - self.headroom)) if self.profile.host_ram else None


def workload_from(settings: TrainSettings) -> Workload:
    attention = "eager" if settings.flash_attn in ("disabled", "eager") else "sdpa"
    return Workload(
        method=settings.method,
        cutoff_len=settings.cutoff_len,
        micro_batch=settings.micro_batch,
        gradient_checkpointing=settings.gradient_checkpointing,
        attention=attention,
        lora_rank=settings.lora_rank,
        quantization_bit=settings.quantization_bit,
        freeze_trainable_layers=settings.freeze_trainable_layers,
        lora_targets=_lora_targets(settings.lora_target),
        optim=settings.optim,
    )


def _lora_targets(text: str) -> tuple[str, ...] | None:
    """LF's ``lora_target``: ``all`` (every linear) or a comma list of module names."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return None if not names or names == ("all",) else names


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _ds_knobs(profile: HardwareProfile, tier: Tier, est_host: int | None, lean: bool) -> DsKnobs:
    """DeepSpeed numbers for this tier on this hardware."""
    small_card = profile.gpu_mem < 40 * GiB
    pin = True
    if tier.offloads and profile.host_ram and est_host is not None:
        pin = est_host < 0.7 * profile.host_ram  # page-locked memory cannot be swapped: leave slack
    return DsKnobs(
        pin_memory=pin,
        allgather_bucket_size=200_000_000 if small_card else 500_000_000,
        max_live_parameters=LEAN_MAX_LIVE if lean else 1_000_000_000,
        max_reuse_distance=LEAN_MAX_LIVE if lean else 1_000_000_000,
    )


def _evaluate(spec, profile, tier, w, headroom, lean=False) -> tuple[Estimate, DsKnobs, bool, bool]:
    knobs = _ds_knobs(profile, tier, None, lean)
    bufs = DsBuffers(allgather_bucket_size=knobs.allgather_bucket_size, max_live_parameters=knobs.max_live_parameters)
    est = estimate(spec, profile, tier, w, bufs)
    knobs = _ds_knobs(profile, tier, est.host_bytes, lean)
    fits_gpu = est.gpu_bytes <= profile.gpu_mem * (1 - headroom)
    fits_host = profile.host_ram is None or est.host_bytes <= profile.host_ram * (1 - headroom)
    return est, knobs, fits_gpu, fits_host


def _plan_tier(spec, profile, tier, w, settings, headroom, requested_mb) -> TierPlan:
    """Estimate a tier at the requested micro-batch, else the largest divisor that fits."""
    effective = requested_mb * settings.grad_accum
    first = None
    for mb in _divisors_desc(requested_mb):
        for lean in ((False, True) if tier.stage == 3 else (False,)):
            wk = replace(w, micro_batch=mb)
            est, knobs, fg, fh = _evaluate(spec, profile, tier, wk, headroom, lean)
            notes = []
            if lean:
                notes.append(f"stage3_max_live_parameters lowered to {LEAN_MAX_LIVE:.0e} to fit")
            if mb != requested_mb:
                notes.append(f"micro-batch {requested_mb} -> {mb}, gradient accumulation "
                             f"{settings.grad_accum} -> {effective // mb} (same effective batch)")
            tp = TierPlan(tier, est, mb, effective // mb, fg, fh, knobs, tuple(notes))
            if first is None:
                first = tp
            if tp.fits:
                return tp
            if not fh:
                return first  # more micro-batches cannot fix host RAM
    return first


def build_ladder(plans: list[TierPlan], profile: HardwareProfile) -> list[str]:
    min_saving = min(1 * GiB, 0.05 * profile.gpu_mem)  # keep in step with the "why" text in _plan_once
    ladder: list[TierPlan] = []
    for tp in sorted(plans, key=lambda p: p.tier.speed_rank):
        if not tp.fits_host:
            continue
        if not ladder or tp.estimate.gpu_bytes <= ladder[-1].estimate.gpu_bytes - min_saving:
            ladder.append(tp)
    return [tp.tier.name for tp in ladder]


def make_plan(profile: HardwareProfile, spec: ModelSpec, settings: TrainSettings, *,
              headroom: float = DEFAULT_HEADROOM, tier: str | None = None,
              allow_cutoff: int | None = None, allow_qlora: bool = False) -> Plan:
    """Plan a run.  ``tier`` forces the starting tier; ``allow_cutoff``/``allow_qlora``
    permit degrading the run when nothing else fits."""
    degraded: list[str] = []
    plan = _plan_once(profile, spec, settings, headroom, tier)
    if plan.choice is None and allow_cutoff and allow_cutoff < settings.cutoff_len:
        cut = settings.cutoff_len
        while plan.choice is None and cut > allow_cutoff:
            cut = max(allow_cutoff, cut // 2)
            plan = _plan_once(profile, spec, replace(settings, cutoff_len=cut), headroom, tier)
        if plan.choice is not None:
            degraded.append(f"cutoff_len {settings.cutoff_len} -> {cut} (allowed by --allow-cutoff {allow_cutoff})")
            settings = plan.settings
    if plan.choice is None and allow_qlora and settings.method == "lora":
        q = replace(settings, method="qlora", quantization_bit=4)
        plan = _plan_once(profile, spec, q, headroom, tier)
        if plan.choice is not None:
            degraded.append("LoRA -> 4-bit QLoRA (allowed by --allow-qlora)")
    plan.degraded = degraded
    plan.why = degraded + plan.why
    return plan


def _plan_once(profile, spec, settings, headroom, forced) -> Plan:
    w = workload_from(settings)
    plans = [_plan_tier(spec, profile, t, w, settings, headroom, settings.micro_batch) for t in TIERS]
    ladder = build_ladder(plans, profile)
    why: list[str] = []
    by = {p.tier.name: p for p in plans}
    usable = profile.gpu_mem * (1 - headroom)
    if forced:
        start = get_tier(forced).name
        choice = start
        why.append(f"{start} was asked for with --tier")
        if not by[start].fits:
            why.append(f"warning: {start} is estimated not to fit ({by[start].estimate.gpu_bytes / GiB:.1f} GiB "
                       f"of {usable / GiB:.1f} GiB usable); dsplan run will fall back on OOM")
    else:
        at_requested = [n for n in ladder if by[n].fits and by[n].micro_batch == settings.micro_batch]
        any_fit = [n for n in ladder if by[n].fits]
        choice = (at_requested or any_fit or [None])[0]
        if choice:
            c = by[choice]
            why.append(f"{choice} is the fastest tier on this run's ladder that fits: "
                       f"{c.estimate.gpu_bytes / GiB:.1f} GiB of {usable / GiB:.1f} GiB usable per GPU "
                       f"({headroom:.0%} headroom)")
            faster = [p for p in plans if p.tier.speed_rank < c.tier.speed_rank]
            for p in faster:
                why.append(f"{p.tier.name} does not fit: {_why_not(p, profile, headroom)}")
            if not at_requested:
                why.append(f"no tier fits micro-batch {settings.micro_batch}: using {c.micro_batch} with "
                           f"gradient accumulation {c.grad_accum}")
        else:
            smallest = min(plans, key=lambda p: p.estimate.gpu_bytes)
            why.append(f"nothing fits, even {smallest.tier.name} at micro-batch {smallest.micro_batch} "
                       f"({smallest.estimate.gpu_bytes / GiB:.1f} GiB > {usable / GiB:.1f} GiB usable)")
            why.append("options: --allow-cutoff N (shorter samples), --allow-qlora (4-bit base weights), "
                       "or more/larger GPUs")
    full_ladder = ladder
    if choice is not None:
        # The run starts at the choice and falls back from there.
        if choice in ladder:
            ladder = ladder[ladder.index(choice):]
        else:
            ladder = [choice] + [n for n in ladder if by[n].estimate.gpu_bytes < by[choice].estimate.gpu_bytes]
    min_saving = min(1 * GiB, 0.05 * profile.gpu_mem)
    for p in plans:
        if p.tier.name not in full_ladder and p.fits_host and p.fits_gpu:
            why.append(f"{p.tier.name} left off the ladder: it would not save {min_saving / GiB:.1f} GiB "
                       f"of GPU memory over a faster tier, only cost speed")
        if not p.fits_host:
            why.append(f"{p.tier.name} refused: needs {p.estimate.host_bytes / GiB:.0f} GiB host RAM per node, "
                       f"{profile.host_ram / GiB:.0f} GiB present")
    if profile.host_ram is None:
        why.append("host RAM unknown (--host-ram): offload tiers assumed to fit in host memory")
    return Plan(profile, spec, settings, w, headroom, plans, ladder, choice, why)


def _why_not(p: TierPlan, profile: HardwareProfile, headroom: float) -> str:
    if not p.fits_host:
        return f"needs {p.estimate.host_bytes / GiB:.0f} GiB host RAM per node"
    top = sorted(p.estimate.gpu.items(), key=lambda kv: -kv[1])[:2]
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in top)
    return (f"{p.estimate.gpu_bytes / GiB:.1f} GiB > {profile.gpu_mem * (1 - headroom) / GiB:.1f} GiB "
            f"(largest: {parts} GiB)")
