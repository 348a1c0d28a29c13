"""``dsplan demo``: the fallback walks a real tier, zero2 -> zero3, on the CPU.

The demo's main act: four two-rank launches, about 3 minutes on a quiet 2-core machine
(``dsplan demo --micro-batch`` is the short act, :mod:`dsplan.demo.demo`).  The two
measuring runs go one after the other: side by side on 2 cores they took longer (118 s
against 36 + 56 s) and the contention moved zero3's VmPeak by 0.2 GiB.  With 2 gloo ranks and a
0.30 B-parameter Qwen2-shaped model whose frozen weights dominate each rank's memory
(LoRA, random bf16 weights that each rank loads as fp32), ZeRO-3 holds half of those
weights per rank and ZeRO-2 all of them.

1. **Measure.**  One short run per tier (one optimizer step, no cap) through dsplan's own
   run loop, while a sampler reads each training rank's kernel high-water marks from
   ``/proc/<pid>/status``: ``VmPeak`` (address space, what ``RLIMIT_AS`` limits) and
   ``VmHWM`` (resident memory).  A cap applies to one process, so the figure that counts is
   the largest *rank*, never a sum.
2. **Cap.**  ``RLIMIT_AS`` halfway between the largest rank's ``VmPeak`` at zero2 and at
   zero3, when they are at least :data:`MIN_GAP_BYTES` apart.  ``RLIMIT_AS`` rather than a
   cap on resident memory: Linux enforces no per-process RSS limit (``RLIMIT_RSS`` is
   ignored), and a memory cgroup limits a group of processes, not one rank, needs root and
   kills with SIGKILL instead of failing an allocation.  The resident figures are measured
   and shown too: the extra fp32 copy of the frozen weights is both reserved and touched,
   so the two gaps are close (1.02 GiB resident against 1.15 GiB of address space here).
3. **Run.**  ``dsplan run``'s fallback loop under that cap from zero2: a rank of attempt 1
   fails to allocate, dsplan ends every rank and attempt 2 at zero3 trains to the end.
   ZeRO-2's peak comes when the Trainer saves the checkpoint after the last step
   (accelerate clones the whole state dict, frozen weights included); the measuring runs
   save too, so their peaks include it.

The peaks and the cap are written to ``tier_peaks.json`` beside the run's ledger.  If the
gap on this machine is too small for a cap with margin, the demo says so with the
figures and shows the micro-batch fall back (``dsplan demo --micro-batch``) instead.

Why the plan has zero3 right after zero2 (the planner keeps a slower tier only when it
saves at least ``min(1 GiB, 5 %)`` of a card): the demo renders ZeRO-3 with
``stage3_max_live_parameters`` 1e6 and ``stage3_max_reuse_distance`` 0 (:data:`LEAN_ZERO3`),
so each layer's gathered weights are freed once it has run.  DeepSpeed's defaults (1e9)
keep every gathered weight of a model this small alive from the second step on, and
ZeRO-3 would then save nothing.  At those knobs the planner's own estimate puts zero3 a
little under zero2 per card (1.73 against 1.88 GiB when this was written), and on pretend 2 GiB cards
(:data:`TIERS_CARD`; 5 % = 0.10 GiB) its ladder rule keeps zero3.  The plan is made as
``--tier zero2 --headroom 0`` would make it: the run starts at zero2, which fits a 2 GiB
card only without headroom.  The pretend card only sizes that rule: on a CPU what runs
out is each rank's host memory, which the measurement covers.  :func:`tiers_plan` refuses,
with the figures, a planner whose estimates no longer give this ladder.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

from dsplan.errors import UserError
from dsplan.fsutil import atomic_write
from dsplan.units import GiB

#: The demo model of this act: 0.30 B parameters (hidden 1536, MLP 6144, 8 layers, 12 heads,
#: 2 KV heads, vocabulary 8192), 1.18 GB in fp32.  Stored in bf16 so that every ZeRO-2 rank
#: makes its own fp32 copy when loading (a float32 checkpoint would stay a file mapping).
TIERS_SHAPE = {"hidden": 1536, "intermediate": 6144, "layers": 8, "heads": 12, "kv_heads": 2, "dtype": "bfloat16"}
TIERS_MODEL_NAME = "wide"
#: Pretend cards the plan is made for, and its headroom (``--headroom``; see the module docstring).
TIERS_CARD = "2G"
TIERS_HEADROOM = 0.0
#: ZeRO-3 knobs of this act: free each layer's gathered weights after use.
LEAN_ZERO3 = {"stage3_max_live_parameters": 1_000_000, "stage3_max_reuse_distance": 0}
#: LF keys of every run of this act: short rows, one per rank, no gradient checkpointing
#: (with it ZeRO-3 holds every gathered layer until the step ends).
TIERS_LF = {"cutoff_len": 64, "per_device_train_batch_size": 1, "disable_gradient_checkpointing": True}
MEASURE_STEPS = 1
RUN_STEPS = 2
#: Smallest zero2 - zero3 gap (largest rank's VmPeak) a cap is set in: a quarter GiB of margin
#: on each side of the midpoint.  Repeated runs here differed by at most 0.02 GiB.
MIN_GAP_BYTES = GiB // 2
PEAKS_FILE = "tier_peaks.json"
#: How often the sampler reads /proc, and how often it prints a progress line.
SAMPLE_EVERY = 0.1
PROGRESS_EVERY = 20.0
TITLE = "dsplan demo"


# ---------------------------------------------------------------- per-rank peaks
def _status_marks(pid: int) -> tuple[int, int] | None:
    """(VmPeak, VmHWM) of a process in bytes, from /proc; None where unreadable."""
    marks = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"VmPeak:", b"VmHWM:")):
                    key, value = line.split(b":", 1)
                    marks[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(marks) != 2:
        return None
    return marks[b"VmPeak"], marks[b"VmHWM"]


def _is_launcher(proc) -> bool:
    return any(Path(arg).name == "launcher.py" for arg in proc.cmdline()[1:3])


def rank_of(proc) -> int | None:
    """The global rank of a training process torchrun started (LLaMA-Factory's ``launcher.py``
    with ``RANK`` in its environment); None for any other process, a child a rank forked
    included (it keeps the rank's command line and environment)."""
    import psutil

    try:
        if not _is_launcher(proc):
            return None
        parent = proc.parent()
        if parent is None or _is_launcher(parent):
            return None
        rank = proc.environ().get("RANK")
    except (psutil.Error, OSError):
        return None
    return int(rank) if rank is not None and rank.isdigit() else None


class RankPeaks(threading.Thread):
    """Samples, every :data:`SAMPLE_EVERY` s, the kernel's high-water marks of every training
    rank among this process's descendants, and calls ``progress(text)`` now and then.
    ``VmPeak`` and ``VmHWM`` only grow, so a sample taken any time after a peak holds it."""

    def __init__(self, progress=None, every: float = SAMPLE_EVERY, progress_every: float = PROGRESS_EVERY):
        super().__init__(daemon=True)
        self.every, self.progress_every, self.progress = every, progress_every, progress
        self.marks: dict[int, dict] = {}  # pid -> {"rank", "vm_peak_bytes", "vm_hwm_bytes"}
        self._ranks: dict[int, int] = {}  # pid -> rank, for the training ranks found so far
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        import psutil

        try:
            procs = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            rank = self._ranks.get(proc.pid)
            if rank is None:  # asked again each time: a child torchrun forked may not have exec'd yet
                rank = rank_of(proc)
                if rank is not None:
                    self._ranks[proc.pid] = rank
            marks = _status_marks(proc.pid) if rank is not None else None
            if marks is None:
                continue
            rec = self.marks.setdefault(proc.pid, {"rank": rank, "pid": proc.pid, "vm_peak_bytes": 0,
                                                   "vm_hwm_bytes": 0})
            rec["vm_peak_bytes"] = max(rec["vm_peak_bytes"], marks[0])
            rec["vm_hwm_bytes"] = max(rec["vm_hwm_bytes"], marks[1])

    def ranks(self) -> list[dict]:
        return sorted((dict(r) for r in self.marks.values()), key=lambda r: (r["rank"], r["pid"]))

    def largest(self, key: str) -> int | None:
        return max((r[key] for r in self.marks.values()), default=None)

    def describe(self) -> str:
        seconds = time.monotonic() - self.t0
        if not self.marks:
            return f"{seconds:.0f} s, starting (importing torch, loading the model)"
        return (f"{seconds:.0f} s, {len(self.marks)} rank(s), largest so far VmPeak "
                f"{self.largest('vm_peak_bytes') / GiB:.2f} GiB, VmHWM {self.largest('vm_hwm_bytes') / GiB:.2f} GiB")

    def run(self) -> None:
        next_progress = self.t0 + self.progress_every
        while not self._halt.is_set():
            self.sample()
            if self.progress is not None and time.monotonic() >= next_progress:
                next_progress += self.progress_every
                self.progress(self.describe())
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


# ---------------------------------------------------------------- plan
def tiers_yaml(model_dir: Path, data_dir: Path, dataset: str, max_steps: int) -> dict:
    from dsplan.demo.demo import demo_yaml

    user = demo_yaml(model_dir, data_dir, dataset, micro_batch=1, max_steps=max_steps)
    user.update(TIERS_LF)
    return user


def tiers_plan(user: dict, model_dir: Path, nproc: int):
    """The demo's CPU plan on pretend :data:`TIERS_CARD` cards, with zero3 re-estimated at
    :data:`LEAN_ZERO3` and the ladder rebuilt from that by the planner's own rule."""
    from dsplan.demo.demo import cpu_plan
    from dsplan.estimate.estimate import estimate
    from dsplan.plan.fallback import build_ladder, min_saving, start_ladder

    plan = cpu_plan(user, model_dir, nproc, card=TIERS_CARD, headroom=TIERS_HEADROOM, tier="zero2")
    old = plan.get("zero3")
    zero = replace(old.ds.zero_optimization, **LEAN_ZERO3)
    est = estimate(plan.model, plan.profile, old.tier, replace(plan.workload, micro_batch=old.micro_batch), zero)
    new = replace(old, estimate=est, ds=replace(old.ds, zero_optimization=zero),
                  fits_gpu=est.gpu_bytes <= plan.usable_gpu,
                  notes=(*old.notes, f"{TITLE}: stage3_max_live_parameters 1e6, stage3_max_reuse_distance 0"))
    plan.tiers = [new if t is old else t for t in plan.tiers]
    full = build_ladder([t for t in plan.tiers if t.refused is None], plan.profile)
    plan.ladder = start_ladder(full, {t.tier.name: t for t in plan.tiers}, "zero2")
    if plan.ladder[:2] != ["zero2", "zero3"]:
        raise UserError(f"{TITLE}: the plan's ladder is {' -> '.join(plan.ladder)}, not zero2 -> zero3: the planner "
                        f"estimates zero2 at {plan.get('zero2').estimate.gpu_bytes / GiB:.2f} GiB and zero3 at "
                        f"{est.gpu_bytes / GiB:.2f} GiB per pretend {TIERS_CARD} card, and keeps a slower tier only "
                        f"if it saves {min_saving(plan.profile) / GiB:.2f} GiB")
    return plan


def explain_plan(plan) -> list[str]:
    """Why the plan's ladder is zero2 -> zero3, with the planner's figures."""
    from dsplan.plan.fallback import min_saving

    z2, z3 = (plan.get(t).estimate.gpu_bytes / GiB for t in ("zero2", "zero3"))
    card = plan.profile.gpu_mem / GiB
    start = (f"{TITLE}: plan as `--tier zero2 --headroom {plan.headroom:g}` on pretend {plan.profile.world_size}x"
             f"{card:g}G cards: ladder {' -> '.join(plan.ladder)}")
    why = (f"{TITLE}: ZeRO-3 renders with stage3_max_live_parameters 1e6 and stage3_max_reuse_distance 0, so each "
           f"layer's gathered weights are freed after use; the planner then estimates zero3 at {z3:.2f} GiB per card "
           f"against zero2's {z2:.2f}, a saving of {z2 - z3:.2f} GiB, which its ladder rule keeps (at least "
           f"min(1 GiB, 5 % of a {card:g} GiB card) = {min_saving(plan.profile) / GiB:.2f} GiB). The pretend card "
           "only sizes that rule: on this CPU what runs out is each rank's host memory, measured next")
    return [start, why]


# ---------------------------------------------------------------- measure
def measure_tier(tier: str, plan, user: dict, run_dir: Path, lf_cli: str, env: dict, say,
                 stall_timeout: float) -> dict:
    """One uncapped run of ``tier`` through dsplan's run loop (one attempt, no fall back) and
    each rank's peaks, sampled from /proc while it ran."""
    from dsplan.launch.ledger import read_attempts
    from dsplan.launch.loop import RunOptions, run

    said: list[str] = []
    opts = RunOptions(run_dir=run_dir, lf_cli=lf_cli, start_tier=tier, max_attempts=1, fallback=False,
                      stall_timeout=stall_timeout, echo=False, env=env)
    sampler = RankPeaks(progress=lambda text: say(f"{TITLE}: measuring {tier}: {text}"))
    sampler.start()
    try:
        code = run(plan, user, opts, say=said.append)
    finally:
        sampler.stop()
    ledger = read_attempts(run_dir)
    verdict = ledger[-1]["verdict"] if ledger else None
    ranks = sampler.ranks()
    if code != 0 or verdict != "success" or len(ranks) != plan.profile.world_size:
        raise UserError(f"{TITLE}: the measuring run at {tier} did not finish cleanly (exit {code}, verdict "
                        f"{verdict}, {len(ranks)} rank(s) seen; log {run_dir}/attempt-001/train.log): "
                        + " | ".join(said[-3:]))
    return {"tier": tier, "run_dir": str(run_dir), "verdict": verdict, "steps": user["max_steps"],
            "seconds": round(time.monotonic() - sampler.t0, 1), "ranks": ranks,
            "vm_peak_bytes": sampler.largest("vm_peak_bytes"), "vm_hwm_bytes": sampler.largest("vm_hwm_bytes")}


def choose_cap(z2: dict, z3: dict, min_gap: int = MIN_GAP_BYTES) -> dict:
    """The per-rank ``RLIMIT_AS`` cap: halfway between the largest rank's VmPeak at zero2 and at
    zero3 when they are ``min_gap`` or more apart; else ``cap_bytes`` None and why."""
    hi, lo = z2["vm_peak_bytes"], z3["vm_peak_bytes"]
    gap = hi - lo
    out = {"limit": "RLIMIT_AS", "figure": "VmPeak", "gap_bytes": gap, "min_gap_bytes": min_gap,
           "hwm_gap_bytes": z2["vm_hwm_bytes"] - z3["vm_hwm_bytes"]}
    if gap >= min_gap:
        out["cap_bytes"] = lo + gap // 2
        out["why"] = (f"halfway between zero2's and zero3's largest rank ({gap / GiB:.2f} GiB apart, at least "
                      f"{min_gap / GiB:.2f} needed): zero2 should fail to allocate, zero3 fit with "
                      f"{gap / 2 / GiB:.2f} GiB to spare")
    else:
        out["cap_bytes"] = None
        out["why"] = (f"zero2's largest rank peaks only {gap / GiB:.2f} GiB above zero3's on this machine (at least "
                      f"{min_gap / GiB:.2f} GiB needed for a cap with margin on both sides)")
    return out


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def peak_lines(record: dict) -> list[str]:
    """The measured peaks and the cap, as the demo prints them."""
    lines = []
    for tier in ("zero2", "zero3"):
        m = record["peaks"][tier]
        ranks = ", ".join(f"rank {r['rank']} {r['vm_peak_bytes'] / GiB:.2f} / {r['vm_hwm_bytes'] / GiB:.2f}"
                          for r in m["ranks"])
        lines.append(f"  {tier} measured ({m['steps']} step, no cap, {m['seconds']:.0f} s): largest rank VmPeak "
                     f"{_gib(m['vm_peak_bytes'])}, VmHWM {_gib(m['vm_hwm_bytes'])} (VmPeak / VmHWM GiB: {ranks})")
    cap = record["cap"]
    lines.append(f"  gap: VmPeak {_gib(cap['gap_bytes'])}, VmHWM {_gib(cap['hwm_gap_bytes'])}")
    if cap["cap_bytes"] is not None:
        lines.append(f"  cap: {cap['limit']} {_gib(cap['cap_bytes'])} per process, {cap['why']}")
    else:
        lines.append(f"  no cap: {cap['why']}")
    return lines


# ---------------------------------------------------------------- the act
def _measure_both(root: Path, assets, nproc: int, lf_cli: str, env: dict, say, stall_timeout: float) -> dict:
    user = tiers_yaml(*assets, max_steps=MEASURE_STEPS)
    plan = tiers_plan(user, assets[0], nproc)
    peaks = {}
    for tier in ("zero2", "zero3"):
        say(f"{TITLE}: measuring {tier}: {MEASURE_STEPS} optimizer step on {nproc} ranks, no cap "
            "(about a minute or two)")
        peaks[tier] = measure_tier(tier, plan, user, root / f"measure-{tier}", lf_cli, env, say, stall_timeout)
        say(f"{TITLE}: {tier}: largest rank VmPeak {_gib(peaks[tier]['vm_peak_bytes'])}, VmHWM "
            f"{_gib(peaks[tier]['vm_hwm_bytes'])} ({peaks[tier]['seconds']:.0f} s)")
    return peaks


def run_tiers_demo(workdir: Path, lf_cli: str, nproc: int = 2, say=print, stall_timeout: float = 900,
                   env: dict[str, str] | None = None) -> tuple[int, Path]:
    """Measure, cap, run; returns (exit code, the run folder holding the ledger and ``tier_peaks.json``)."""
    from dsplan.demo.assets import make_demo_assets
    from dsplan.demo.demo import cpu_env, fresh_dir, prepare_workdir

    if nproc < 2:
        raise UserError(f"{TITLE} needs --nproc 2 or more: ZeRO-3 shards the weights across ranks")
    workdir = prepare_workdir(workdir)
    say(f"{TITLE}: building a 0.30 B-parameter Qwen2-shaped model (bf16, random weights) and a dataset in "
        f"{workdir / 'assets'} (about 15 s the first time; no hub)")
    assets = make_demo_assets(workdir / "assets", name=TIERS_MODEL_NAME, **TIERS_SHAPE)
    root = fresh_dir(workdir, "tiers")
    child_env = cpu_env(lf_cli, env)
    run_user = tiers_yaml(*assets, max_steps=RUN_STEPS)
    plan = tiers_plan(run_user, assets[0], nproc)
    for line in explain_plan(plan):
        say(line)
    peaks = _measure_both(root, assets, nproc, lf_cli, child_env, say, stall_timeout)
    record = {"model": {"dir": str(assets[0]), **TIERS_SHAPE}, "nproc": nproc, "peaks": peaks,
              "cap": choose_cap(peaks["zero2"], peaks["zero3"])}
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    for line in peak_lines(record):
        say(f"{TITLE}:{line}")
    if record["cap"]["cap_bytes"] is None:
        return _micro_batch_instead(workdir, lf_cli, run_dir, record, say, stall_timeout, env)
    atomic_write(run_dir / PEAKS_FILE, json.dumps(record, indent=2) + "\n")
    return _capped_run(plan, run_user, run_dir, root, lf_cli, record["cap"]["cap_bytes"], child_env, say,
                       stall_timeout), run_dir


def _capped_run(plan, user: dict, run_dir: Path, root: Path, lf_cli: str, cap: int, env: dict, say,
                stall_timeout: float) -> int:
    from dsplan.demo.demo import _capped_cli
    from dsplan.launch.loop import RunOptions, run

    wrapper = _capped_cli(root / "bin", lf_cli, cap)
    say(f"{TITLE}: now `dsplan run` from zero2 with every training process capped at {_gib(cap)} of address "
        f"space (RLIMIT_AS): a zero2 rank should fail to allocate, dsplan end every rank and fall back to zero3")
    opts = RunOptions(run_dir=run_dir, lf_cli=str(wrapper), start_tier="zero2", max_attempts=3,
                      stall_timeout=stall_timeout, env=env)
    return run(plan, user, opts, say=say)


def _micro_batch_instead(workdir: Path, lf_cli: str, run_dir: Path, record: dict, say, stall_timeout: float,
                         env) -> tuple[int, Path]:
    """The gap is too small for a cap with margin: say so (done by the caller) and show the
    micro-batch fall back instead, noting where in ``tier_peaks.json``."""
    from dsplan.demo.demo import run_demo

    say(f"{TITLE}: the tier gap on this machine is too small for a per-rank cap; showing the micro-batch fall "
        "back (`dsplan demo --micro-batch`) instead")
    code, mb_dir = run_demo(workdir, lf_cli, say=say, stall_timeout=stall_timeout, env=env)
    record["micro_batch_run"] = str(mb_dir)
    atomic_write(run_dir / PEAKS_FILE, json.dumps(record, indent=2) + "\n")
    return code, run_dir


def summarize_tiers(run_dir: Path) -> list[str]:
    """The measured peaks and cap, then the run's attempts (the micro-batch run's when the gap was too small)."""
    from dsplan.demo.demo import summarize

    record = json.loads((Path(run_dir) / PEAKS_FILE).read_text(encoding="utf-8"))
    lines = [f"per-rank peaks measured on this machine ({record['nproc']} ranks; {run_dir / PEAKS_FILE}):"]
    lines += peak_lines(record)
    if record.get("micro_batch_run"):
        return lines + ["instead, the micro-batch fall back:"] + summarize(Path(record["micro_batch_run"]))
    return lines + summarize(Path(run_dir))
