"""``dsplan run``: the fallback loop.  Plan, render one tier into a fresh attempt folder,
launch ``llamafactory-cli train``, read the verdict, step down the ladder on OOM.

Last stage of the data flow (plan -> render -> **launch**).  One controller makes
every decision; the environment of a node comes from :mod:`dsplan.launch.node_env`.
The ledger is the run's state: a rerun on the same ``--run-dir`` continues where
the last attempt left off and never repeats a configuration that ran out of
memory.  Exit codes are :class:`dsplan.codes.ExitCode`.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from dsplan.codes import EXIT_FOR_VERDICT, OOM_VERDICTS, ExitCode, Verdict
from dsplan.emit.render import lf_filename, render_plan
from dsplan.errors import UserError
from dsplan.fsutil import write_new_files
from dsplan.inputs.settings import TrainSettings
from dsplan.launch.ledger import AttemptRecord, RunState, append_attempt, next_attempt_dir
from dsplan.launch.node_env import child_env
from dsplan.plan.fallback import ladder_from, next_step
from dsplan.plan.planner import Plan
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


def _last_checkpoint(output_dir: Path) -> Path | None:
    cks = []
    for p in output_dir.glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if p.is_dir() and tail.isdigit():
            cks.append((int(tail), p))
    return max(cks)[1] if cks else None


def prepare_attempt(plan: Plan, tier: str, micro_batch: int, grad_accum: int, run_dir: Path, user: dict,
                    resume_from: Path | None) -> dict:
    """Render one tier into a new attempt folder; returns what the launch needs."""
    attempt_dir = next_attempt_dir(run_dir)
    tp = plan.get(tier)
    tc = replace(tp.tier_config(), micro_batch=micro_batch, grad_accum=grad_accum)
    output_dir = attempt_dir / "output"
    settings: TrainSettings = replace(plan.settings, output_dir=str(output_dir))
    user = dict(user)
    user.pop("output_dir", None)
    user.pop("resume_from_checkpoint", None)
    if resume_from is not None:
        user["resume_from_checkpoint"] = str(resume_from)
    bundle = render_plan(plan, [tc], attempt_dir, user, settings=settings)
    write_new_files(bundle.files)
    return {
        "dir": attempt_dir,
        "number": int(attempt_dir.name.rsplit("-", 1)[1]),
        "yaml": attempt_dir / lf_filename(tp.tier),
        "output_dir": output_dir,
        "tier": tc,
    }


def describe_dry_run(plan: Plan, opts: RunOptions, base_env: dict[str, str]) -> list[str]:
    tier = get_tier(opts.start_tier).name if opts.start_tier else plan.choice
    _, changes = child_env(plan.profile, opts, base_env)
    tp = plan.get(tier)
    lines = [
        f"run folder: {opts.run_dir}",
        f"ladder: {' -> '.join(ladder_from(plan, tier))}",
        f"attempt 1: tier {tier}, micro-batch {tp.micro_batch} x GA {tp.grad_accum}, "
        f"cutoff {plan.settings.cutoff_len}",
        f"  files: {opts.run_dir}/attempt-NNN/{lf_filename(tp.tier)}, ds_{tier}.json, dsplan.json, train.log, output/",
        f"  command: {opts.lf_cli} train {opts.run_dir}/attempt-NNN/{lf_filename(tp.tier)}",
        "  environment: " + ("; ".join(changes) if changes else "(unchanged)"),
    ]
    return lines


@dataclass(frozen=True)
class Step:
    """One configuration to try: a tier and its batch knobs."""

    tier: str
    micro_batch: int
    grad_accum: int

    def describe(self, cutoff_len: int) -> str:
        return f"tier {self.tier} (micro-batch {self.micro_batch} x GA {self.grad_accum}, cutoff {cutoff_len})"


def _open_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --run-dir {run_dir}: {e.strerror or e}") from None
    if any(ch.isspace() for ch in str(run_dir.resolve())):
        raise UserError(f"--run-dir {run_dir} contains whitespace; llamafactory-cli's torchrun launcher "
                        "splits its arguments on spaces, so choose a path without any")


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
    say(f"dsplan run: continuing from the ledger: attempt {last.attempt} ended {last.verdict} at "
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


def _resume_point(state: RunState, step: Step, say) -> Path | None:
    """The last checkpoint of the previous attempt, when it ran the same tier (its optimizer shards fit)."""
    last = state.last
    if last is None or last.tier != step.tier:
        return None
    ck = _last_checkpoint(Path(last.output_dir))
    if ck is not None:
        say(f"dsplan run: resuming tier {step.tier} from {ck}")
    return ck


def _launch(plan: Plan, user: dict, opts: RunOptions, step: Step, resume_from: Path | None, env: dict,
            stop: threading.Event, say) -> AttemptRecord:
    """Render, run and record one attempt."""
    from dsplan.launch.attempt import run_attempt
    from dsplan.logs.classifier import Classifier

    att = prepare_attempt(plan, step.tier, step.micro_batch, step.grad_accum, opts.run_dir, user, resume_from)
    say(f"dsplan run: attempt {att['number']} {step.describe(plan.settings.cutoff_len)} in {att['dir']}")
    outcome = run_attempt([opts.lf_cli, "train", str(att["yaml"])], env, att["dir"], att["dir"] / "train.log",
                          att["output_dir"] / "trainer_log.jsonl", Classifier(), stall_timeout=opts.stall_timeout,
                          grace=opts.grace, echo=opts.echo, stop_event=stop)
    f = outcome.finding
    rec = AttemptRecord(attempt=att["number"], tier=step.tier, micro_batch=step.micro_batch,
                        grad_accum=step.grad_accum, cutoff_len=plan.settings.cutoff_len, started=outcome.started,
                        ended=outcome.ended, exit_code=outcome.exit_code, verdict=str(f.verdict),
                        evidence=f.evidence or "", output_dir=str(att["output_dir"]))
    append_attempt(opts.run_dir, rec.to_dict())
    say(f"dsplan run: attempt {rec.attempt} verdict {rec.verdict}" + (f": {rec.evidence}" if rec.evidence else ""))
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


def run(plan: Plan, user: dict, opts: RunOptions, say=print) -> int:
    """The fallback loop; returns the exit code.  A rerun on the same folder continues from its ledger."""
    from dsplan.launch.attempt import stop_on_signals

    _open_run_dir(opts.run_dir)
    state = RunState.load(opts.run_dir)
    step = _first_step(plan, opts, state, say)
    if isinstance(step, ExitCode):
        return step
    ladder = ladder_from(plan, step.tier)
    resume_from = _resume_point(state, step, say)
    env, changes = child_env(plan.profile, opts, dict(opts.env if opts.env is not None else os.environ))
    if changes:
        say("dsplan run: environment " + "; ".join(changes))
    stop = threading.Event()
    attempts = 0
    with stop_on_signals(stop):
        while not stop.is_set():  # a Ctrl-C between attempts ends the loop
            step = _skip_known_ooms(plan, step, state, ladder, say)
            if step is None:
                say(f"dsplan run: nothing left to fall back to (ladder {' -> '.join(ladder)})")
                return ExitCode.EXHAUSTED
            attempts += 1
            rec = _launch(plan, user, opts, step, resume_from, env, stop, say)
            state.records.append(rec)
            resume_from = None
            step = _decide(plan, opts, step, rec, ladder, attempts, say)
            if isinstance(step, ExitCode):
                return step
    return ExitCode.INTERRUPTED
