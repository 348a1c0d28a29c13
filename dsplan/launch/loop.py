"""``dsplan run``: the fallback loop.  Plan, render one tier into a fresh attempt folder,
launch ``llamafactory-cli train``, read the verdict, step down the ladder on OOM.

Last stage of the data flow (plan -> render -> **launch**).  One controller makes
every decision; the environment of a node comes from :mod:`dsplan.launch.node_env`.
Inside a Slurm allocation the controller runs each attempt as one srun step over
every node (:mod:`dsplan.launch.placement`), so one OOM on any node ends the
attempt everywhere and leads to one fall back.  Each attempt starts from the
newest checkpoint the run's attempts left: exactly at the same tier, by its
weights, schedule and step count across a tier change (:mod:`dsplan.launch.resume`).
The ledger is the run's state: a rerun on the same ``--run-dir`` continues where
the last attempt left off and never repeats a configuration that ran out of
memory.  Exit codes are :class:`dsplan.codes.ExitCode`.

Before anything else the run folder is locked (:mod:`dsplan.launch.rundir`) and
the processes a dead dsplan left there are ended
(:func:`dsplan.launch.orphans.cleanup_orphans`).  Each attempt is rendered, then
its started line is written (with space kept for its end line), and only then is
the command launched, so every attempt that ran has a record, and a signal
between attempts still leaves an ``interrupted`` one.  An ``OSError`` after that
(a full disk, a command that cannot be executed) ends the run with one line and
``ExitCode.OS_ERROR``; a rendered folder without a record is removed.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from dsplan.codes import EXIT_FOR_VERDICT, OOM_VERDICTS, ExitCode, Verdict
from dsplan.emit.render import lf_filename, render_plan
from dsplan.errors import UserError
from dsplan.fsutil import write_new_files
from dsplan.inputs.settings import TrainSettings
from dsplan.launch.ledger import ATTEMPTS_FILE, AttemptRecord, AttemptSlot, RunState, next_attempt_dir, start_attempt
from dsplan.launch.measure import attempt_measurements, hardware_fields, plan_assumptions
from dsplan.launch.node_env import child_env
from dsplan.launch.orphans import RECORD_FILE, TreeRecord, cleanup_orphans
from dsplan.launch.placement import Placement, detect_placement
from dsplan.launch.resume import Resume, find_resume
from dsplan.launch.rundir import RunDirLock, describe_os_error, open_run_dir
from dsplan.plan.fallback import ladder_from, next_step
from dsplan.plan.planner import Plan, estimate_at
from dsplan.plan.tiers import get_tier


@dataclass
class RunOptions:
    run_dir: Path
    lf_cli: str
    start_tier: str | None = None
    max_attempts: int = 6
    fallback: bool = True
    stall_timeout: float | None = 1800.0
    grace: float = 3.0
    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    echo: bool = True
    env: dict[str, str] | None = None  # the child's base environment; None = this process's
    #: ``--preflight``: a :class:`dsplan.launch.preflight.Preflight`; each configuration's real
    #: attempt is then preceded by a preflight attempt on the longest samples.
    preflight: object = None
    #: The folder LF runs in: where ``dsplan run`` was started (None: this process's current folder),
    #: so the YAML's relative paths (``dataset_dir: data``, LF's default, a local model or adapter)
    #: mean what they mean to ``llamafactory-cli train`` started there and to ``plan``.
    workdir: Path | None = None


def resolve_lf_cli(flag: str | None) -> str:
    """``--lf-cli`` > ``$DSPLAN_LF_CLI`` > ``llamafactory-cli`` on PATH > the one installed
    beside this Python (``dsplan[train]`` puts both in one environment)."""
    import sys

    cand = flag or os.environ.get("DSPLAN_LF_CLI") or "llamafactory-cli"
    if os.sep in cand:
        found = str(Path(cand).absolute()) if os.access(cand, os.X_OK) and Path(cand).is_file() else None
    else:
        found = shutil.which(cand)
        beside = Path(sys.executable).parent / cand
        if found is None and os.access(beside, os.X_OK):
            found = str(beside)
    if not found:
        raise UserError(f"{cand} not found: install dsplan[train] (LLaMA-Factory), or pass --lf-cli PATH")
    return found


def prepare_attempt(plan: Plan, tier: str, micro_batch: int, grad_accum: int, run_dir: Path, user: dict,
                    resume: Resume | None, after: int = 0, preflight=None) -> dict:
    """Render one tier into a new attempt folder (numbered above ``after``); returns what
    the launch needs.  ``resume`` is where it starts from (:mod:`dsplan.launch.resume`):
    the checkpoint as ``resume_from_checkpoint``, and for a weights resume across tiers
    also as the adapter (LoRA/QLoRA) or the model (full/freeze).  ``preflight`` (a
    :class:`~dsplan.launch.preflight.Preflight`) makes it a preflight attempt: its dataset
    of the longest samples is written into the folder and the YAML points at it.  If
    rendering fails the folder is removed before the error goes on."""
    attempt_dir = next_attempt_dir(run_dir, after)
    try:
        tp = plan.get(tier)
        tc = replace(tp.tier_config(), micro_batch=micro_batch, grad_accum=grad_accum)
        output_dir = attempt_dir / "output"
        settings: TrainSettings = replace(plan.settings, output_dir=str(output_dir))
        user = dict(user)
        user.pop("output_dir", None)
        user.pop("resume_from_checkpoint", None)
        if resume is not None:
            user = resume.user_keys(user)
            if resume.model_path is not None:
                settings = replace(settings, model_name_or_path=resume.model_path)
        if preflight is not None:
            from dsplan.launch.preflight import with_data

            user = preflight.attempt_user(user, attempt_dir, micro_batch, grad_accum, plan.profile.world_size)
            settings = with_data(settings, user)
        bundle = render_plan(plan, [tc], attempt_dir, user, settings=settings)
        write_new_files(bundle.files)
    except BaseException as e:
        shutil.rmtree(attempt_dir, ignore_errors=True)
        cause = e.__cause__ if isinstance(e, UserError) else e
        if isinstance(cause, OSError):  # the system refused (a full disk), not the user's input
            raise OSError(cause.errno, cause.strerror or str(cause), str(cause.filename or attempt_dir)) from None
        raise
    return {
        "dir": attempt_dir,
        "number": int(attempt_dir.name.rsplit("-", 1)[1]),
        "yaml": attempt_dir / lf_filename(tp.tier),
        "output_dir": output_dir,
        "tier": tc,
    }


def describe_dry_run(plan: Plan, opts: RunOptions, base_env: dict[str, str]) -> list[str]:
    tier = get_tier(opts.start_tier).name if opts.start_tier else plan.choice
    placement = detect_placement(plan.profile, opts, base_env)
    _, changes = child_env(plan.profile, placement.node_options(opts), base_env)
    tp = plan.get(tier)
    yaml_path = f"{opts.run_dir}/attempt-NNN/{lf_filename(tp.tier)}"
    config = f"tier {tier}, micro-batch {tp.micro_batch} x GA {tp.grad_accum}, cutoff {plan.settings.cutoff_len}"
    lines = [f"run folder: {opts.run_dir}", f"ladder: {' -> '.join(ladder_from(plan, tier))}"]
    if opts.preflight is not None:
        from dsplan.launch.preflight import dry_run_lines

        lines += dry_run_lines(opts.preflight, config, tp.micro_batch, tp.grad_accum, plan.profile.world_size,
                               f"{opts.run_dir}/attempt-NNN")
    lines += [
        f"attempt {2 if opts.preflight is not None else 1}: {config}"
        + (" (once its preflight passes)" if opts.preflight is not None else ""),
        f"  files: {opts.run_dir}/attempt-NNN/{lf_filename(tp.tier)}, ds_{tier}.json, dsplan.json, train.log, output/",
        f"  command: {' '.join(placement.argv(opts.lf_cli, yaml_path, 1))}",
        "  environment: " + ("; ".join(changes) if changes else "(unchanged)"),
    ]
    if placement.describe():
        lines.insert(1, placement.describe())
    return lines


@dataclass(frozen=True)
class Step:
    """One configuration to try: a tier and its batch knobs."""

    tier: str
    micro_batch: int
    grad_accum: int

    def describe(self, cutoff_len: int) -> str:
        return f"tier {self.tier} (micro-batch {self.micro_batch} x GA {self.grad_accum}, cutoff {cutoff_len})"


def _planned(plan: Plan, tier: str) -> Step:
    tp = plan.get(tier)
    return Step(tier, tp.micro_batch, tp.grad_accum)


def _next(plan: Plan, step: Step, verdict: str, ladder: list[str]) -> Step | None:
    """The configuration after an OOM at ``step``: down the ladder, else a smaller micro-batch."""
    nxt = next_step(plan, step.tier, step.micro_batch, step.grad_accum, verdict)
    if nxt is None or (nxt[0] != step.tier and nxt[0] not in ladder):
        return None
    return Step(*nxt)


def _first_step(plan: Plan, opts: RunOptions, state: RunState, say) -> Step | ExitCode:
    """Where this invocation starts: the ledger's next step on a rerun, else --tier, else the plan's choice."""
    last = state.last
    if state.finished:
        say(f"dsplan run: {opts.run_dir} already holds a finished run (attempt {last.attempt}); "
            "use a new --run-dir to train again")
        return ExitCode.SUCCESS
    if opts.start_tier:
        tier = get_tier(opts.start_tier).name
        if last is not None and last.tier != tier:
            say(f"dsplan run: last attempt used {last.tier}; starting a new attempt at {tier} (--tier)")
        return _planned(plan, tier)
    if last is None:
        if plan.choice is None:
            say("dsplan run: nothing fits this hardware (see `dsplan plan`); pass --tier to try anyway")
            return ExitCode.NOTHING_FITS
        return _planned(plan, plan.choice)
    step = Step(last.tier, last.micro_batch, last.grad_accum)
    if last.is_unfinished:
        say(f"dsplan run: continuing from the ledger: attempt {last.attempt} at {step.describe(last.cutoff_len)} "
            "has no end record (its dsplan stopped during it); counting it as interrupted")
    else:
        say(f"dsplan run: continuing from the ledger: {'preflight ' if last.is_preflight else ''}attempt "
            f"{last.attempt} ended {last.verdict} at "
            f"{step.describe(last.cutoff_len)}")
    return step


def _skip_known_ooms(plan: Plan, step: Step, state: RunState, ladder: list[str], say) -> Step | None:
    """Never run a configuration again that already ran out of memory in this run folder."""
    cutoff = plan.settings.cutoff_len
    while step is not None:
        rec = state.oom_attempt(step.tier, step.micro_batch, cutoff)
        if rec is None:
            return step
        nxt = _next(plan, step, rec.verdict, ladder)
        say(f"dsplan run: not repeating {step.describe(cutoff)}: attempt {rec.attempt} ran out of memory with it "
            f"({rec.verdict})" + (f"; next {nxt.describe(cutoff)}" if nxt else ""))
        step = nxt
    return None


def _resume_point(plan: Plan, state: RunState, step: Step, say) -> Resume | None:
    """Where the attempt at ``step`` starts: the newest complete checkpoint of the run's attempts,
    exactly at the same tier, by its weights across a tier change (:mod:`dsplan.launch.resume`)."""
    real = [r for r in state.records if not r.is_preflight]  # no attempt resumes from a preflight
    resume = find_resume(real, step.tier, plan.settings.method)
    if resume is not None:
        say(f"dsplan run: {resume.describe()}")
    return resume


class AttemptNotStarted(Exception):
    """The training command could not be executed; the attempt is recorded, the run ends."""


def _exec_hint(path: str) -> str:
    """Why a program that exists might still not execute: a #! line with a carriage return."""
    try:
        with open(path, "rb") as f:
            head = f.readline(256)
    except OSError:
        return ""
    if head.startswith(b"#!") and head.rstrip(b"\n").endswith(b"\r"):
        return " (its #! line ends in a carriage return: the file has Windows (CRLF) line endings)"
    return ""


@dataclass
class _Context:
    """What every attempt of one invocation shares: the options, where attempts run, the
    child's base environment, the stop flag and the line printer."""

    opts: RunOptions
    placement: Placement
    env: dict
    stop: threading.Event
    say: Callable[[str], None]
    env_changes: list[str]


@dataclass
class _Attempt:
    """One attempt being run: its rendered folder, configuration, ledger slot and start point."""

    att: dict
    step: Step
    cutoff_len: int
    resume: Resume | None
    slot: AttemptSlot | None = None
    estimate: object = None  # the plan's Estimate for this tier at this micro-batch
    assumed: dict | None = None  # what that estimate assumed (measure.plan_assumptions)
    hardware: dict | None = None  # the plan's hardware profile, as ledger fields
    preflight: bool = False  # a --preflight attempt on the longest samples

    def fields(self) -> dict:
        """The keys its started line and its end record share."""
        out = {"attempt": self.att["number"], "tier": self.step.tier, "micro_batch": self.step.micro_batch,
               "grad_accum": self.step.grad_accum, "cutoff_len": self.cutoff_len,
               "output_dir": str(self.att["output_dir"])}
        if self.resume is not None:
            out["resumed_from"] = self.resume.ledger()
        if self.hardware is not None:
            out["hardware"] = dict(self.hardware)
        if self.preflight:
            out["preflight"] = True
        return out


def _open_slot(ctx: _Context, a: _Attempt) -> AttemptSlot:
    """Write the attempt's started line; if that fails, the rendered folder goes too."""
    try:
        return start_attempt(ctx.opts.run_dir, {**a.fields(), "started": _now(), "pid": os.getpid(),
                                                **ctx.placement.started_fields()})
    except BaseException:
        shutil.rmtree(a.att["dir"], ignore_errors=True)
        raise


def _now() -> str:
    from dsplan.launch.attempt import now_iso

    return now_iso()


def _record(ctx: _Context, a: _Attempt, exit_code, verdict: str, evidence: str, outcome=None) -> AttemptRecord:
    """Write the attempt's end record (``outcome``: the supervisor's, when the command ran)."""
    started = outcome.started if outcome is not None else a.slot.started["started"]
    host_peak = getattr(outcome, "host_peak_bytes", None)
    measured = attempt_measurements(a.estimate, a.att["output_dir"] / "trainer_log.jsonl", host_peak,
                                    evidence or "", str(verdict), a.assumed)
    rec = a.slot.complete({**a.fields(), "started": started, "ended": _now(), "exit_code": exit_code,
                           "verdict": str(verdict), "evidence": evidence or "",
                           **ctx.placement.end_fields(outcome), **measured})
    return AttemptRecord.from_dict(rec)


def _not_started(opts: RunOptions, e: OSError) -> str:
    """One line on why the attempt could not start."""
    if e.filename is not None and os.fspath(e.filename) == opts.lf_cli:
        return f"cannot run {opts.lf_cli}: {e.strerror or e}{_exec_hint(opts.lf_cli)}"
    return f"cannot start the attempt: {describe_os_error(e)}"


def _run_one(ctx: _Context, a: _Attempt) -> AttemptRecord:
    """Launch the attempt and record how it ended (a command that cannot start included)."""
    from dsplan.launch.attempt import StartError, run_attempt
    from dsplan.logs.classifier import Classifier

    opts, n = ctx.opts, a.att["number"]
    env = a.resume.env(ctx.env) if a.resume is not None else ctx.env
    try:
        outcome = run_attempt(ctx.placement.argv(opts.lf_cli, a.att["yaml"], n), env, opts.workdir or Path.cwd(),
                              a.att["dir"] / "train.log", a.att["output_dir"] / "trainer_log.jsonl", Classifier(),
                              stall_timeout=opts.stall_timeout, grace=opts.grace, echo=opts.echo,
                              stop_event=ctx.stop, tree_record=TreeRecord(opts.run_dir / RECORD_FILE, n, ctx.say),
                              labelled=ctx.placement.labelled, before_kill=ctx.placement.before_kill(n))
    except StartError as e:
        line = _not_started(opts, e)
        _record(ctx, a, None, Verdict.NOT_OOM, line)
        raise AttemptNotStarted(line) from None
    except OSError as e:  # the attempt was taken down on the way out; say so in its record, then stop
        _record(ctx, a, None, Verdict.UNKNOWN, f"dsplan stopped supervising this attempt: {describe_os_error(e)}")
        raise
    f = outcome.finding
    return _record(ctx, a, outcome.exit_code, f.verdict, f.evidence, outcome)


def _launch(ctx: _Context, plan: Plan, user: dict, step: Step, state: RunState,
            preflight: bool = False) -> AttemptRecord:
    """Render, record as started, run and record one attempt (``preflight``: on the longest samples)."""
    cutoff = plan.settings.cutoff_len
    resume = None if preflight else _resume_point(plan, state, step, ctx.say)
    att = prepare_attempt(plan, step.tier, step.micro_batch, step.grad_accum, ctx.opts.run_dir, user, resume,
                          after=state.highest, preflight=ctx.opts.preflight if preflight else None)
    a = _Attempt(att, step, cutoff, resume, estimate=estimate_at(plan, step.tier, step.micro_batch),
                 assumed=plan_assumptions(plan, step.micro_batch),
                 hardware=hardware_fields(plan.profile), preflight=preflight)
    a.slot = _open_slot(ctx, a)
    try:
        if ctx.stop.is_set():  # a signal came between attempts: this one never starts, but it is recorded
            rec = _record(ctx, a, None, Verdict.INTERRUPTED, "stop requested (signal to dsplan) before the attempt "
                          "started")
        else:
            ctx.say(f"dsplan run: {'preflight attempt' if preflight else 'attempt'} {att['number']} "
                    f"{step.describe(cutoff)} in {att['dir']}")
            if preflight:
                ctx.say("dsplan run: " + ctx.opts.preflight.describe(step.micro_batch, step.grad_accum,
                                                                     plan.profile.world_size))
            rec = _run_one(ctx, a)
    finally:
        if not a.slot.done:
            a.slot.release()
    origin = "".join(f" {k} {rec.extra[k]}" for k in ("evidence_node", "evidence_rank") if rec.extra.get(k) is not None)
    what = "preflight attempt" if preflight else "attempt"
    ctx.say(f"dsplan run: {what} {rec.attempt} verdict {rec.verdict}" + (f" (from{origin})" if origin else "")
            + (f": {rec.evidence}" if rec.evidence else ""))
    return rec


def _decide(plan: Plan, opts: RunOptions, step: Step, rec: AttemptRecord, ladder: list[str], attempts: int,
            say) -> Step | ExitCode:
    """After an attempt: the exit code to end with, or the next configuration to try."""
    if rec.verdict not in OOM_VERDICTS:
        if rec.verdict in (Verdict.NOT_OOM, Verdict.UNKNOWN):
            say("dsplan run: not an out-of-memory failure; not falling back (see the evidence above)")
        return EXIT_FOR_VERDICT[Verdict(rec.verdict)]
    if not opts.fallback:
        say("dsplan run: --no-fallback given; stopping")
        return ExitCode.EXHAUSTED
    nxt = _next(plan, step, rec.verdict, ladder)
    if nxt is None:
        say(f"dsplan run: {rec.verdict} at {step.tier} with micro-batch {step.micro_batch}: nothing left to fall "
            f"back to (ladder {' -> '.join(ladder)})")
        return ExitCode.EXHAUSTED
    if attempts >= opts.max_attempts:
        say(f"dsplan run: --max-attempts {opts.max_attempts} reached")
        return ExitCode.EXHAUSTED
    what = (f"{step.tier} -> {nxt.tier}" if nxt.tier != step.tier
            else f"{step.tier}: micro-batch {step.micro_batch} -> {nxt.micro_batch}, gradient accumulation "
                 f"{step.grad_accum} -> {nxt.grad_accum}")
    say(f"dsplan run: falling back {what}")
    return nxt


def _load_state(opts: RunOptions, say) -> RunState:
    """The ledger, with one line for each damaged line skipped; unreadable is a user error."""
    try:
        state = RunState.load(opts.run_dir)
    except OSError as e:
        raise UserError(f"cannot read the ledger {opts.run_dir / ATTEMPTS_FILE}: {e.strerror or e}") from None
    for problem in state.problems:
        say(f"dsplan run: {problem}")
    return state


def _wants_preflight(opts: RunOptions, plan: Plan, step: Step, state: RunState, say) -> bool:
    """``--preflight``: whether ``step`` still needs its preflight (one that passed in this run folder stands)."""
    if opts.preflight is None:
        return False
    cutoff = plan.settings.cutoff_len
    passed = state.preflight_passed(step.tier, step.micro_batch, cutoff)
    if passed is None:
        return True
    say(f"dsplan run: the preflight at {step.describe(cutoff)} already passed (attempt {passed.attempt}); "
        "not repeating it")
    return False


def _after_preflight(plan: Plan, opts: RunOptions, step: Step, rec: AttemptRecord, ladder: list[str],
                     attempts: int, say) -> Step | ExitCode:
    """A preflight that did not pass: an OOM falls back as any attempt's does (the next configuration
    gets its own preflight); anything else stops before the real run."""
    config = step.describe(plan.settings.cutoff_len)
    if rec.verdict in OOM_VERDICTS:
        say(f"dsplan run: the preflight ran out of memory ({rec.verdict}) at {config}; the real run did not start "
            "there")
    else:
        say(f"dsplan run: the preflight at {config} ended {rec.verdict}, not out of memory; the real run was not "
            "started")
    return _decide(plan, opts, step, rec, ladder, attempts, say)


def _loop(ctx: _Context, plan: Plan, user: dict) -> int:
    """From the ledger's state to the run's exit code (the run folder is locked)."""
    opts, say = ctx.opts, ctx.say
    cleanup_orphans(opts.run_dir, say, grace=opts.grace)
    state = _load_state(opts, say)
    step = _first_step(plan, opts, state, say)
    if isinstance(step, ExitCode):
        return step
    ladder = ladder_from(plan, step.tier)
    if ctx.env_changes:
        say("dsplan run: environment " + "; ".join(ctx.env_changes))
    if ctx.placement.describe():
        say(f"dsplan run: {ctx.placement.describe()}")
    attempts = 0
    while True:
        step = _skip_known_ooms(plan, step, state, ladder, say)
        if step is None:
            say(f"dsplan run: nothing left to fall back to (ladder {' -> '.join(ladder)})")
            return ExitCode.EXHAUSTED
        attempts += 1
        if _wants_preflight(opts, plan, step, state, say):
            rec = _launch(ctx, plan, user, step, state, preflight=True)
            state.records.append(rec)
            if rec.verdict != Verdict.SUCCESS:
                step = _after_preflight(plan, opts, step, rec, ladder, attempts, say)
                if isinstance(step, ExitCode):
                    return step
                continue
            say(f"dsplan run: preflight passed at {step.describe(plan.settings.cutoff_len)}; starting the real run")
            attempts += 1
        rec = _launch(ctx, plan, user, step, state)
        state.records.append(rec)
        step = _decide(plan, opts, step, rec, ladder, attempts, say)
        if isinstance(step, ExitCode):
            return step


def _context(plan: Plan, opts: RunOptions, placement: Placement, base: dict, stop: threading.Event,
             say) -> _Context:
    """The environment attempts start from, and what dsplan changed in it."""
    env, changes = child_env(plan.profile, placement.node_options(opts), base)
    return _Context(opts, placement, env, stop, say, changes)


def run(plan: Plan, user: dict, opts: RunOptions, say=print) -> int:
    """The fallback loop; returns the exit code.  A rerun on the same folder continues from its ledger.
    Problems with the run folder itself, or a Slurm job of another size than the plan, raise
    :class:`UserError` (exit 2) before anything is written.  Inside a Slurm allocation (and
    without the per-node flags) every attempt is one srun step over all its nodes
    (:mod:`dsplan.launch.placement`); only this process, the controller, holds the run folder."""
    from dsplan.launch.attempt import stop_on_signals

    base = dict(opts.env if opts.env is not None else os.environ)
    placement = detect_placement(plan.profile, opts, base)
    open_run_dir(opts.run_dir)
    stop = threading.Event()
    with stop_on_signals(stop), RunDirLock(opts.run_dir) as lock:
        if lock.warning:
            say(f"dsplan run: warning: {lock.warning}")
        ctx = _context(plan, opts, placement, base, stop, say)
        try:
            return _loop(ctx, plan, user)
        except AttemptNotStarted as e:
            say(f"dsplan run: {e}")
            return ExitCode.OS_ERROR
        except OSError as e:
            say(f"dsplan run: {describe_os_error(e)}; stopping (the attempts recorded in "
                f"{opts.run_dir / ATTEMPTS_FILE} are intact)")
            return ExitCode.OS_ERROR


def cleanup_run_dir(run_dir: Path, say=print, grace: float = 3.0) -> int:
    """``dsplan run --cleanup``: end the processes a dead dsplan left running from this run
    folder, say what was found, and exit.  Trains nothing.  Exit 0, or 1 when some of them
    survived SIGKILL; a live dsplan holding the folder is a :class:`UserError` (exit 2)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        say(f"dsplan run --cleanup: {run_dir} is not a folder; nothing to clean up")
        return ExitCode.SUCCESS
    with RunDirLock(run_dir):
        report = cleanup_orphans(run_dir, say, grace=grace, prefix="dsplan run --cleanup")
    if not report.found_record:
        say(f"dsplan run --cleanup: no process list in {run_dir}: the last dsplan there exited cleanly; "
            "nothing to clean up")
    return ExitCode.FAILED if report.survivors else ExitCode.SUCCESS
