"""``dsplan run``: the fallback loop.  Plan, render one tier into a fresh attempt folder,
launch ``llamafactory-cli train``, read the verdict, step down the ladder on OOM.

Last stage of the data flow (plan -> render -> **launch**).  One controller makes
every decision: the environment for a node is built by :func:`node_env` from the
profile and a node rank, so a later multi-node driver (one ``srun`` step per node,
say) can start the same argv on every node and still take one fall-back decision
for all of them from the verdicts this loop already reads.

Exit codes (also in the README):
  0 success; 1 the training failed for a reason other than memory (not_oom);
  2 usage error; 3 out of memory on the last tier of the ladder, or --max-attempts
  reached, or --no-fallback after an OOM; 4 nothing fits and no --tier was given;
  5 stalled (the watchdog ended a silent run); 130 interrupted (Ctrl-C/SIGTERM).
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from dsplan.codes import ExitCode
from dsplan.errors import UserError
from dsplan.fsutil import write_new_files
from dsplan.inputs.hardware import DEVICE_MASK_VAR, HardwareProfile
from dsplan.plan.planner import Plan
from dsplan.emit.render import lf_filename, render_bundle
from dsplan.inputs.settings import TrainSettings
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


def node_env(profile: HardwareProfile, base: dict[str, str], *, nnodes: int | None = None,
             node_rank: int | None = None, master_addr: str | None = None,
             master_port: int | None = None) -> tuple[dict[str, str], list[str]]:
    """The child's environment: the user's, plus what LLaMA-Factory's launcher reads.
    Returns the environment and a list of what dsplan set or removed."""
    env = dict(base)
    changes: list[str] = []

    def put(key: str, value: str) -> None:
        if env.get(key) != value:
            changes.append(f"{key}={value}")
        env[key] = value

    put("FORCE_TORCHRUN", "1")  # LF needs torchrun for any DeepSpeed config
    put("NPROC_PER_NODE", str(profile.gpus_per_node))
    nodes = nnodes or profile.nodes
    if nodes > 1 or nnodes is not None:
        put("NNODES", str(nodes))
        put("NODE_RANK", str(node_rank or 0))
    if master_addr:
        put("MASTER_ADDR", master_addr)
    if master_port:
        put("MASTER_PORT", str(master_port))
    mask = DEVICE_MASK_VAR[profile.backend]
    other = "CUDA_VISIBLE_DEVICES" if mask == "HIP_VISIBLE_DEVICES" else "HIP_VISIBLE_DEVICES"
    if mask not in env:
        put(mask, ",".join(str(i) for i in range(profile.gpus_per_node)))
    if other in env:  # exactly one mask: a second one with other indices confuses HIP
        changes.append(f"unset {other} (was {env.pop(other)!r}; {mask} is the mask on {profile.backend})")
    return env, changes


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
    from dsplan.launch.ledger import next_attempt_dir

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
    bundle = render_bundle(plan.profile, plan.model, settings, [tc], attempt_dir, user,
                           extra_manifest={"plan": {"choice": plan.choice, "ladder": plan.ladder}})
    write_new_files(bundle.files)
    return {
        "dir": attempt_dir,
        "number": int(attempt_dir.name.rsplit("-", 1)[1]),
        "yaml": attempt_dir / lf_filename(tp.tier),
        "output_dir": output_dir,
        "tier": tc,
    }


def child_env(plan: Plan, opts: RunOptions, base: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """What every attempt's child runs with: :func:`node_env` for this node, and the folder
    of the llamafactory-cli being run first on PATH, since LF starts a bare `torchrun`."""
    env, changes = node_env(plan.profile, base, nnodes=opts.nnodes, node_rank=opts.node_rank,
                            master_addr=opts.master_addr, master_port=opts.master_port)
    cli_dir = str(Path(opts.lf_cli).parent)
    if Path(opts.lf_cli).is_absolute() and cli_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = cli_dir + os.pathsep + env.get("PATH", "")
        changes.append(f"PATH={cli_dir}:$PATH (so LLaMA-Factory's bare `torchrun` is the one beside it)")
    return env, changes


def describe_dry_run(plan: Plan, opts: RunOptions, base_env: dict[str, str]) -> list[str]:
    tier = get_tier(opts.start_tier).name if opts.start_tier else plan.choice
    _, changes = child_env(plan, opts, base_env)
    tp = plan.get(tier)
    lines = [
        f"run folder: {opts.run_dir}",
        f"ladder: {' -> '.join(plan.ladder_from(tier))}",
        f"attempt 1: tier {tier}, micro-batch {tp.micro_batch} x GA {tp.grad_accum}, "
        f"cutoff {plan.settings.cutoff_len}",
        f"  files: {opts.run_dir}/attempt-NNN/{lf_filename(tp.tier)}, ds_{tier}.json, dsplan.json, train.log, output/",
        f"  command: {opts.lf_cli} train {opts.run_dir}/attempt-NNN/{lf_filename(tp.tier)}",
        "  environment: " + ("; ".join(changes) if changes else "(unchanged)"),
    ]
    return lines


def run(plan: Plan, user: dict, opts: RunOptions, say=print) -> int:
    """The fallback loop; returns the exit code."""
    from dsplan.launch.attempt import run_attempt, stop_on_signals
    from dsplan.launch.ledger import append_attempt, read_attempts
    from dsplan.logs.classifier import Classifier

    run_dir = opts.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --run-dir {run_dir}: {e.strerror or e}") from None
    if any(ch.isspace() for ch in str(run_dir.resolve())):
        raise UserError(f"--run-dir {run_dir} contains whitespace; llamafactory-cli's torchrun launcher "
                        "splits its arguments on spaces, so choose a path without any")
    tier = get_tier(opts.start_tier).name if opts.start_tier else plan.choice
    if tier is None:
        say("dsplan run: nothing fits this hardware (see `dsplan plan`); pass --tier to try anyway")
        return ExitCode.NOTHING_FITS
    ladder = plan.ladder_from(tier)

    resume_from = None
    history = read_attempts(run_dir)
    if history:
        last = history[-1]
        if last["verdict"] == "success":
            say(f"dsplan run: {run_dir} already holds a finished run (attempt {last['attempt']}); "
                "use a new --run-dir to train again")
            return ExitCode.SUCCESS
        ck = _last_checkpoint(Path(last["output_dir"])) if last.get("output_dir") else None
        if last["tier"] == tier and ck is not None:
            resume_from = ck
            say(f"dsplan run: resuming tier {tier} from {ck}")
        elif last["tier"] != tier:
            say(f"dsplan run: last attempt used {last['tier']}; starting a new attempt at {tier}")

    stop = threading.Event()
    env, changes = child_env(plan, opts, dict(opts.env if opts.env is not None else os.environ))
    micro_batch, grad_accum = plan.get(tier).micro_batch, plan.get(tier).grad_accum
    attempts_here = 0
    with stop_on_signals(stop):
        while True:
            if stop.is_set():  # Ctrl-C arrived between attempts
                return ExitCode.INTERRUPTED
            attempts_here += 1
            att = prepare_attempt(plan, tier, micro_batch, grad_accum, run_dir, user, resume_from)
            resume_from = None
            tp = att["tier"]
            argv = [opts.lf_cli, "train", str(att["yaml"])]
            say(f"dsplan run: attempt {att['number']} tier {tier} (micro-batch {tp.micro_batch} x GA "
                f"{tp.grad_accum}, cutoff {plan.settings.cutoff_len}) in {att['dir']}")
            if changes:
                say("dsplan run: environment " + "; ".join(changes))
            outcome = run_attempt(argv, env, att["dir"], att["dir"] / "train.log",
                                  att["output_dir"] / "trainer_log.jsonl", Classifier(),
                                  stall_timeout=opts.stall_timeout, grace=opts.grace, echo=opts.echo,
                                  stop_event=stop)
            f = outcome.finding
            append_attempt(run_dir, {
                "attempt": att["number"], "tier": tier, "micro_batch": tp.micro_batch,
                "grad_accum": tp.grad_accum, "cutoff_len": plan.settings.cutoff_len,
                "started": outcome.started, "ended": outcome.ended, "exit_code": outcome.exit_code,
                "verdict": f.verdict, "evidence": f.evidence, "output_dir": str(att["output_dir"]),
            })
            say(f"dsplan run: attempt {att['number']} verdict {f.verdict}" + (f": {f.evidence}" if f.evidence else ""))
            if f.verdict == "success":
                return ExitCode.SUCCESS
            if f.verdict == "interrupted":
                return ExitCode.INTERRUPTED
            if f.verdict == "stalled":
                return ExitCode.STALLED
            if f.verdict not in ("gpu_oom", "host_oom"):
                say("dsplan run: not an out-of-memory failure; not falling back (see the evidence above)")
                return ExitCode.FAILED
            if not opts.fallback:
                say("dsplan run: --no-fallback given; stopping")
                return ExitCode.EXHAUSTED
            step = plan.next_step(tier, micro_batch, grad_accum, f.verdict)
            if step is not None and step[0] != tier and step[0] not in ladder:
                step = None
            if step is None:
                say(f"dsplan run: {f.verdict} at {tier} with micro-batch {micro_batch}: nothing left to fall back "
                    f"to (ladder {' -> '.join(ladder)})")
                return ExitCode.EXHAUSTED
            if attempts_here >= opts.max_attempts:
                say(f"dsplan run: --max-attempts {opts.max_attempts} reached")
                return ExitCode.EXHAUSTED
            what = (f"{tier} -> {step[0]}" if step[0] != tier
                    else f"{tier}: micro-batch {micro_batch} -> {step[1]}, gradient accumulation {grad_accum} -> {step[2]}")
            say(f"dsplan run: falling back {what}")
            tier, micro_batch, grad_accum = step
