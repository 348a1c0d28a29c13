"""Planner: estimate every tier, build this run's fallback ladder, pick the fastest tier that fits.

Fourth stage of the data flow.  ``plan``, ``render`` and ``run`` all call
:func:`make_plan`; the ladder it returns is the one ``run`` walks down on OOM.

Rules, in one place:
- A tier *fits* when its GPU estimate is within the card's memory less the headroom,
  and (for offload tiers) its host estimate is within the node's RAM less the
  headroom.  Unknown host RAM is assumed to fit, with a note.
- The ladder (:mod:`dsplan.plan.fallback`) goes fastest first and keeps a slower tier
  only if it saves at least ``min(1 GiB, 5 % of the card)`` of GPU memory over the
  last tier kept, and only if the host can hold it.  So LoRA's ZeRO-2 + offload (it
  offloads adapters' optimizer states only) and ZeRO-3 on one GPU (gathering costs
  more than it shards) drop out, while a model larger than one card keeps its ZeRO-3
  tiers.  The plan's ladder starts at the chosen tier.
- Each micro-batch holds the worst real batch when a dataset was measured
  (:mod:`dsplan.plan.dataset`): every row as long as the longest sample after truncation,
  padded as LF's collator pads it (``cutoff_len`` with packing); else ``cutoff_len`` rows.
- The choice is the first ladder tier that fits at the requested micro-batch.  If
  none does, micro-batch goes down to the largest of its divisors that fits (found by
  bisection, since memory grows with the micro-batch) and gradient accumulation up,
  so micro-batch x accumulation stays the same.
- ``run`` falls back along the ladder; below its last tier it at least halves the
  micro-batch (raising accumulation to keep the product) down to 1: activations and
  logits are what the estimate is least sure of, and both shrink with the micro-batch.
- Each tier's DeepSpeed numbers (:func:`_ds_config`): DeepSpeed's defaults, except a
  smaller allgather bucket on cards under 40 GiB, a lean ZeRO-3 working set when
  the defaults do not fit, and unpinned offload when the host estimate passes 70 %
  of host RAM.  The estimate is computed from the same config the renderer writes.
- Degrading the run itself (a shorter ``cutoff_len``, 4-bit QLoRA) happens only
  when the user allows it (``allow_cutoff``, ``allow_qlora``), never silently.
- A tier LLaMA-Factory refuses for this config (:func:`~dsplan.plan.tiers.lf_refusal`)
  is estimated and shown, but never chosen nor on the ladder; the plan says why.  When
  it refuses every tier, or the one asked for with ``--tier``, that is a one-line
  user error.  Inputs the estimate does not model become ``warnings``
  (:mod:`dsplan.plan.lf_checks`), listed under "why" too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from dsplan.errors import UserError
from dsplan.estimate.estimate import Estimate, Runtime, estimate
from dsplan.estimate.workload import Workload
from dsplan.inputs.hardware import HardwareProfile
from dsplan.inputs.model import ModelSpec
from dsplan.inputs.settings import TrainSettings, check_lf_rules
from dsplan.learn.trace import calibrated, calibration_json, calibration_why
from dsplan.plan.dataset import data_seq_len, data_why, dataset_json
from dsplan.plan.fallback import build_ladder, divisors_desc, min_saving, start_ladder
from dsplan.plan.lf_checks import check_model_rules, unmodelled
from dsplan.plan.tiers import TIERS, Tier, TierConfig, get_tier, lf_refusal
from dsplan.schema.ds import DsConfig, Offload, ZeroOptimization
from dsplan.schema.lf_names import LF_VERSION
from dsplan.units import GiB

DEFAULT_HEADROOM = 0.05
#: Cards below this size get a smaller ZeRO-2 allgather bucket.
SMALL_CARD_BYTES = 40 * GiB
SMALL_CARD_ALLGATHER_BUCKET = 200_000_000
#: ZeRO-3 "lean" setting the planner may use when DeepSpeed's defaults do not fit:
#: stage3_max_live_parameters and stage3_max_reuse_distance, elements.
LEAN_MAX_LIVE = 300_000_000
#: Offloaded states are pinned only while the host estimate stays below this fraction of
#: host RAM: page-locked memory cannot be swapped out, so leave slack.
PIN_HOST_FRACTION = 0.7


@dataclass
class TierPlan:
    """One tier, estimated at the knobs the planner would use for it."""

    tier: Tier
    estimate: Estimate
    micro_batch: int
    grad_accum: int
    fits_gpu: bool
    fits_host: bool
    ds: DsConfig
    notes: tuple[str, ...] = ()
    refused: str | None = None  # LLaMA-Factory's reason for refusing this tier

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def tier_config(self) -> TierConfig:
        return TierConfig(self.tier, self.micro_batch, self.grad_accum, self.ds, self.notes, self.refused)

    def to_dict(self, in_ladder: bool) -> dict:
        return {
            "tier": self.tier.name,
            "fits": self.fits,
            "fits_gpu": self.fits_gpu,
            "fits_host": self.fits_host,
            "in_ladder": in_ladder,
            "speed_rank": self.tier.speed_rank,
            "gpu_bytes": self.estimate.gpu_bytes,
            "host_bytes": self.estimate.host_bytes,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "breakdown": dict(self.estimate.gpu),
            "host_breakdown": dict(self.estimate.host),
            "notes": list(self.notes),
            "refused_by_lf": self.refused,
        }


@dataclass
class Plan:
    """Every tier's estimate, this run's fallback ladder, the choice and the reasons.
    Walking the ladder after an OOM is :mod:`dsplan.plan.fallback`'s job."""

    profile: HardwareProfile
    model: ModelSpec
    settings: TrainSettings
    workload: Workload
    headroom: float
    tiers: list[TierPlan]  # all four, in TIERS order
    ladder: list[str]  # fallback order, fastest first, from the choice down
    choice: str | None
    why: list[str]
    degraded: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # inputs the estimate does not model
    data: Any = None  # the dataset's DataProfile (dsplan.inputs.data) when one was measured
    cutoff_plan: Plan | None = None  # the same plan at cutoff_len, when the data planned shorter rows
    calibration: Any = None  # the calibration entry its overhead used (dsplan.learn.calibration.Entry), or None

    def get(self, name: str) -> TierPlan:
        return next(t for t in self.tiers if t.tier.name == name)

    @property
    def chosen(self) -> TierPlan | None:
        return self.get(self.choice) if self.choice else None

    @property
    def usable_gpu(self) -> int:
        return int(self.profile.gpu_mem * (1 - self.headroom))

    @property
    def usable_host(self) -> int | None:
        return int(self.profile.host_ram * (1 - self.headroom)) if self.profile.host_ram else None

    def to_dict(self) -> dict:
        """``plan --json`` (its schema is in the README)."""
        return {
            "choice": self.choice,
            "ladder": list(self.ladder),
            "headroom": self.headroom,
            "gpu_bytes_available": self.usable_gpu,
            "host_bytes_available": self.usable_host,
            "why": list(self.why),
            "warnings": list(self.warnings),
            "degraded": list(self.degraded),
            "hardware": self.profile.to_dict(),
            "model": self.model.to_dict(),
            "workload": {**self.workload.__dict__, "seq_len": self.workload.seq_len},
            "dataset": dataset_json(self),
            "tiers": [t.to_dict(t.tier.name in self.ladder) for t in self.tiers],
            "calibration": self.calibration.summary() if self.calibration is not None else None,
            "model_calibration": calibration_json(self),
        }


# ---------------------------------------------------------------- inputs
def estimate_at(plan: Plan, tier: str, micro_batch: int) -> Estimate:
    """The estimate of one tier at the micro-batch an attempt really ran (after a micro-batch fall back)."""
    tp = plan.get(tier)
    if micro_batch == tp.micro_batch:
        return tp.estimate
    w = replace(plan.workload, micro_batch=micro_batch)
    runtime = plan.calibration.runtime if plan.calibration is not None else None
    return calibrated(estimate(plan.model, plan.profile, tp.tier, w, tp.ds.zero_optimization, runtime), plan.model,
                      tp.tier, w)


def workload_from(settings: TrainSettings, data: Any = None) -> Workload:
    """The workload of ``settings``; ``data`` (a DataProfile) sets the rows' length to the worst real batch's."""
    s = settings
    attention = "eager" if s.flash_attn in ("disabled", "eager") else "sdpa"
    new_tokens = s.max_new_tokens if s.max_new_tokens > 0 else max(0, s.max_length - s.cutoff_len)
    return Workload(
        method=s.method,
        cutoff_len=s.cutoff_len,
        data_len=data_seq_len(data, s.cutoff_len),
        micro_batch=s.micro_batch,
        gradient_checkpointing=s.gradient_checkpointing,
        attention=attention,
        lora_rank=s.lora_rank,
        quantization_bit=s.quantization_bit,
        freeze_trainable_layers=s.freeze_trainable_layers,
        lora_targets=_lora_targets(s.lora_target),
        optim=s.optim,
        stage=s.stage, pref_loss=s.pref_loss, ref_model=s.ref_model,
        ref_quantization_bit=s.ref_model_quantization_bit, reward_model_type=s.reward_model_type,
        reward_quantization_bit=s.reward_model_quantization_bit, max_new_tokens=new_tokens,
        liger=s.enable_liger_kernel, use_dora=s.use_dora, adapter=s.adapter, oft_rank=s.oft_rank,
        oft_block_size=s.oft_block_size, extra_modules=_extra_modules(s),
        freeze_modules=_names(s.freeze_trainable_modules) or ("all",), quantization_method=s.quantization_method,
        attention_mask_4d=s.neat_packing and s.flash_attn != "fa2", image_max_pixels=s.image_max_pixels,
        freeze_vision_tower=s.freeze_vision_tower, freeze_multi_modal_projector=s.freeze_multi_modal_projector,
        freeze_language_model=s.freeze_language_model,
    )


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _extra_modules(s: TrainSettings) -> tuple[str, ...]:
    """Modules trained in full besides the method's own: LoRA/OFT's ``additional_target`` (with
    ``resize_vocab`` and none given, LF adds the embeddings itself), freeze's ``freeze_extra_modules``."""
    if s.method in ("lora", "qlora"):
        if s.additional_target:
            return _names(s.additional_target)
        return ("embed_tokens", "lm_head") if s.resize_vocab else ()
    if s.method == "freeze":
        return _names(s.freeze_extra_modules)
    return ()


def _lora_targets(text: str) -> tuple[str, ...] | None:
    """LF's ``lora_target``: ``all`` (every linear) or a comma list of module names."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return None if not names or names == ("all",) else names


# ---------------------------------------------------------------- one tier
def _ds_config(profile: HardwareProfile, tier: Tier, lean: bool, est_host: int | None = None) -> DsConfig:
    """The DeepSpeed config of this tier on this hardware; ``est_host`` (the host estimate,
    if known) decides whether offloaded states are pinned."""
    zero: dict = {"stage": tier.stage}
    if tier.offloads:
        pin = True
        if profile.host_ram and est_host is not None:
            pin = est_host < PIN_HOST_FRACTION * profile.host_ram
        if tier.offload_optimizer:
            zero["offload_optimizer"] = Offload(pin_memory=pin)
        if tier.offload_param:
            zero["offload_param"] = Offload(pin_memory=pin)
    if tier.stage < 3 and profile.gpu_mem < SMALL_CARD_BYTES:
        zero["allgather_bucket_size"] = SMALL_CARD_ALLGATHER_BUCKET
    if lean:
        zero["stage3_max_live_parameters"] = LEAN_MAX_LIVE
        zero["stage3_max_reuse_distance"] = LEAN_MAX_LIVE
    return DsConfig(zero_optimization=ZeroOptimization(**zero))


def _evaluate(spec, profile, tier, w, headroom, lean=False, runtime=None) -> tuple[Estimate, DsConfig, bool, bool]:
    est = estimate(spec, profile, tier, w, _ds_config(profile, tier, lean).zero_optimization, runtime)
    est = calibrated(est, spec, tier, w)  # a model calibration of this architecture and settings, if any
    ds = _ds_config(profile, tier, lean, est.host_bytes)
    fits_gpu = est.gpu_bytes <= profile.gpu_mem * (1 - headroom)
    fits_host = profile.host_ram is None or est.host_bytes <= profile.host_ram * (1 - headroom)
    return est, ds, fits_gpu, fits_host


def _at(spec, profile, tier, w, settings, headroom, requested_mb, mb,
        runtime=None) -> tuple[TierPlan, TierPlan | None, bool]:
    """The tier at micro-batch ``mb``: (its plan at DeepSpeed's defaults, the first variant that
    fits -- the defaults, then at ZeRO-3 the lean working set -- or None, whether host RAM refused)."""
    effective = requested_mb * settings.grad_accum
    plain = None
    for lean in ((False, True) if tier.stage == 3 else (False,)):
        est, ds, fg, fh = _evaluate(spec, profile, tier, replace(w, micro_batch=mb), headroom, lean, runtime)
        notes = []
        if lean:
            notes.append(f"stage3_max_live_parameters lowered to {LEAN_MAX_LIVE:.0e} to fit")
        if mb != requested_mb:
            notes.append(f"micro-batch {requested_mb} -> {mb}, gradient accumulation "
                         f"{settings.grad_accum} -> {effective // mb} (same effective batch)")
        tp = TierPlan(tier, est, mb, effective // mb, fg, fh, ds, tuple(notes))
        plain = plain or tp
        if tp.fits:
            return plain, tp, False
        if not fh:
            return plain, None, True  # more micro-batches cannot fix host RAM
    return plain, None, False


def _plan_tier(spec, profile, tier, w, settings, headroom, requested_mb, runtime=None) -> TierPlan:
    """Estimate a tier at the requested micro-batch, else at the largest divisor of it that fits
    (the plan at the requested one when none does).  Memory grows with the micro-batch, so the
    divisors are bisected: about log2(number of divisors) estimates, never one per divisor."""
    first, fit, host = _at(spec, profile, tier, w, settings, headroom, requested_mb, requested_mb, runtime)
    if fit is not None or host:
        return fit or first
    candidates = divisors_desc(requested_mb)  # candidates[0] is requested_mb itself
    lo, hi, best = 1, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        _, fit, host = _at(spec, profile, tier, w, settings, headroom, requested_mb, candidates[mid], runtime)
        if host:
            return first
        if fit is not None:
            best, hi = fit, mid - 1
        else:
            lo = mid + 1
    return best or first


# ---------------------------------------------------------------- the plan
def make_plan(profile: HardwareProfile, spec: ModelSpec, settings: TrainSettings, *,
              headroom: float = DEFAULT_HEADROOM, tier: str | None = None,
              allow_cutoff: int | None = None, allow_qlora: bool = False, data: Any = None,
              calibration: Any = None) -> Plan:
    """Plan a run.  ``tier`` forces the starting tier; ``allow_cutoff``/``allow_qlora``
    permit degrading the run when nothing else fits.  ``data``, the dataset's
    :class:`~dsplan.inputs.data.DataProfile`, plans for its worst real micro-batch
    instead of cutoff_len x micro-batch (:mod:`dsplan.plan.dataset`).  ``calibration``, the
    profile's entry of the site calibration (:mod:`dsplan.learn.calibration`), supplies the
    runtime overhead's coefficients; None keeps dsplan's defaults, and ``why`` says which."""
    check_model_rules(settings, spec)
    runtime = calibration.runtime if calibration is not None else None
    degraded: list[str] = []
    plan = _plan_once(profile, spec, settings, headroom, tier, data, runtime=runtime)
    if plan.choice is None and allow_cutoff and allow_cutoff < settings.cutoff_len:
        plan = _shorter_cutoff(profile, spec, settings, headroom, tier, allow_cutoff, data, runtime)
        if plan.choice is not None:
            degraded.append(f"cutoff_len {settings.cutoff_len} -> {plan.settings.cutoff_len} "
                            f"(allowed by --allow-cutoff {allow_cutoff})")
            settings = plan.settings
    if plan.choice is None and allow_qlora and settings.method == "lora" and _lf_accepts_qlora(settings):
        q = replace(settings, method="qlora", quantization_bit=4)
        plan = _plan_once(profile, spec, q, headroom, tier, data, runtime=runtime)
        if plan.choice is not None:
            degraded.append("LoRA -> 4-bit QLoRA (allowed by --allow-qlora)")
    plan.degraded = degraded
    plan.warnings = unmodelled(plan.settings, spec, plan.workload)
    if plan.workload.data_len is not None and plan.workload.data_len < plan.settings.cutoff_len:
        plan.cutoff_plan = _plan_once(profile, spec, plan.settings, headroom, tier, None, runtime=runtime)
        plan.cutoff_plan.calibration = calibration  # compared under the same overhead coefficients
    plan.calibration = calibration
    plan.why = (degraded + plan.why + data_why(plan) + [_calibration_why(calibration, profile)]
                + calibration_why(plan) + [f"warning: {line}" for line in plan.warnings])
    return plan


def _calibration_why(calibration: Any, profile: HardwareProfile) -> str:
    """Where the runtime overhead's coefficients come from: the site calibration, or dsplan's defaults."""
    if calibration is not None:
        return calibration.why()
    rt = Runtime.default(profile.backend)
    from dsplan.learn.calibration import unmatched_why  # the file's entries for other cards of this backend

    hint = unmatched_why(profile)
    return (f"runtime overhead uncalibrated: dsplan's defaults for {profile.backend} (context "
            f"{rt.context_bytes / GiB:.2f} GiB, allocator slack {rt.slack[2]:.0%} at ZeRO-2, {rt.slack[3]:.0%} at "
            "ZeRO-3); `dsplan calibrate --from RUN_DIR` fits them to measured runs" + (f"; {hint}" if hint else ""))


def _lf_accepts_qlora(settings: TrainSettings) -> bool:
    """Whether LLaMA-Factory takes the config once it is made a 4-bit QLoRA."""
    try:
        check_lf_rules(replace(settings, method="qlora", quantization_bit=4))
    except UserError:
        return False
    return True


def _shorter_cutoff(profile, spec, settings, headroom, forced, allow_cutoff, data, runtime=None) -> Plan:
    """Halve cutoff_len (not below ``allow_cutoff``) until a tier fits; the last plan tried."""
    cut = settings.cutoff_len
    while True:
        cut = max(allow_cutoff, cut // 2)
        plan = _plan_once(profile, spec, replace(settings, cutoff_len=cut), headroom, forced, data, runtime=runtime)
        if plan.choice is not None or cut <= allow_cutoff:
            return plan


def _plan_once(profile, spec, settings, headroom, forced, data=None, runtime=None) -> Plan:
    w = workload_from(settings, data)
    plans = [_plan_tier(spec, profile, t, w, settings, headroom, settings.micro_batch, runtime) for t in TIERS]
    for p in plans:
        p.refused = lf_refusal(p.tier, settings, spec)
    accepted = [p for p in plans if p.refused is None]
    if not accepted:
        reasons = " ".join(dict.fromkeys(p.refused for p in plans))
        raise UserError(f"LLaMA-Factory {LF_VERSION} refuses every DeepSpeed tier for this config: {reasons} "
                        "(dsplan plans DeepSpeed runs only)")
    full_ladder = build_ladder(accepted, profile)  # a tier LF refuses is never on the ladder
    by = {p.tier.name: p for p in plans}
    if forced:
        choice, why = _forced_choice(by, forced, profile, headroom)
    else:
        choice, why = _best_choice(plans, full_ladder, settings.micro_batch, profile, headroom)
    # The run starts at the choice and falls back from there.
    ladder = start_ladder(full_ladder, by, choice) if choice is not None else full_ladder
    why += _ladder_notes(plans, full_ladder, profile)
    return Plan(profile, spec, settings, w, headroom, plans, ladder, choice, why, data=data)


def _forced_choice(by: dict[str, TierPlan], forced: str, profile: HardwareProfile,
                   headroom: float) -> tuple[str, list[str]]:
    start = get_tier(forced).name
    if by[start].refused:
        raise UserError(f"--tier {start}: LLaMA-Factory {LF_VERSION} refuses it for this config: "
                        f"{by[start].refused}")
    why = [f"{start} was asked for with --tier"]
    if not by[start].fits:
        usable = profile.gpu_mem * (1 - headroom)
        why.append(f"warning: {start} is estimated not to fit ({by[start].estimate.gpu_bytes / GiB:.1f} GiB "
                   f"of {usable / GiB:.1f} GiB usable); dsplan run will fall back on OOM")
    return start, why


def _best_choice(plans: list[TierPlan], ladder: list[str], requested_mb: int, profile: HardwareProfile,
                 headroom: float) -> tuple[str | None, list[str]]:
    """The first ladder tier that fits, at the requested micro-batch if any does."""
    by = {p.tier.name: p for p in plans}
    usable = profile.gpu_mem * (1 - headroom)
    at_requested = [n for n in ladder if by[n].fits and by[n].micro_batch == requested_mb]
    any_fit = [n for n in ladder if by[n].fits]
    choice = (at_requested or any_fit or [None])[0]
    if choice is None:
        smallest = min((p for p in plans if p.refused is None), key=lambda p: p.estimate.gpu_bytes)
        return None, [f"nothing fits, even {smallest.tier.name} at micro-batch {smallest.micro_batch} "
                      f"({smallest.estimate.gpu_bytes / GiB:.1f} GiB > {usable / GiB:.1f} GiB usable)",
                      "options: --allow-cutoff N (shorter samples), --allow-qlora (4-bit base weights), "
                      "or more/larger GPUs"]
    c = by[choice]
    why = [f"{choice} is the fastest tier on this run's ladder that fits: "
           f"{c.estimate.gpu_bytes / GiB:.1f} GiB of {usable / GiB:.1f} GiB usable per GPU "
           f"({headroom:.0%} headroom)"]
    for p in plans:
        if p.tier.speed_rank < c.tier.speed_rank and p.refused is None:
            why.append(f"{p.tier.name} does not fit: {_why_not(p, profile, headroom)}")
    if not at_requested:
        why.append(f"no tier fits micro-batch {requested_mb}: using {c.micro_batch} with "
                   f"gradient accumulation {c.grad_accum}")
    return choice, why


def _ladder_notes(plans: list[TierPlan], ladder: list[str], profile: HardwareProfile) -> list[str]:
    """Why tiers are missing from the ladder, and what is assumed about host RAM."""
    saving = min_saving(profile)
    why = []
    for p in plans:
        if p.refused:
            why.append(f"{p.tier.name} refused by LLaMA-Factory: {p.refused}")
            continue
        if p.tier.name not in ladder and p.fits_host and p.fits_gpu:
            why.append(f"{p.tier.name} left off the ladder: it would not save {saving / GiB:.1f} GiB "
                       f"of GPU memory over a faster tier, only cost speed")
        if not p.fits_host:
            why.append(f"{p.tier.name} refused: needs {p.estimate.host_bytes / GiB:.0f} GiB host RAM per node, "
                       f"{profile.host_ram / GiB:.0f} GiB present")
    if profile.host_ram is None:
        needs = {p.tier.name: p.estimate.host_bytes for p in plans if p.tier.name in ladder}
        most = max(needs, key=needs.get, default=None)
        size = f"; {most} needs {needs[most] / GiB:,.0f} GiB per node: check the nodes have it" if most else ""
        why.append(f"host RAM unknown (--host-ram): offload tiers assumed to fit in host memory{size}")
    return why


def _why_not(p: TierPlan, profile: HardwareProfile, headroom: float) -> str:
    if not p.fits_host:
        return f"needs {p.estimate.host_bytes / GiB:.0f} GiB host RAM per node"
    top = sorted(p.estimate.gpu.items(), key=lambda kv: -kv[1])[:2]
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in top)
    return (f"{p.estimate.gpu_bytes / GiB:.1f} GiB > {profile.gpu_mem * (1 - headroom) / GiB:.1f} GiB "
            f"(largest: {parts} GiB)")
