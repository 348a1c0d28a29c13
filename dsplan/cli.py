"""Command line: options -> one request -> one call per command -> an exit code.

Every user error (bad ``--gpus``, unknown tier, missing model folder, malformed
YAML, a click usage error) ends as one line on stderr and exit code 2, before
anything is written.  Every number option has a range (:class:`BoundedInt`,
:class:`FiniteFloat`) and the line quotes at most an excerpt of the bad value.  The options that feed LLaMA-Factory keys are generated from
``dsplan.schema.lf``.  Heavy modules are imported inside the commands that need
them: ``render``, ``plan``, ``run``, ``diagnose``, ``report``, ``calibrate``, ``validate`` and ``presets``
never import torch, DeepSpeed or LLaMA-Factory in this process (``validate`` runs a
worker process for that; ``report`` imports matplotlib only for ``--plot``); ``demo``
does, to build its tiny model.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import click

from dsplan import __version__
from dsplan.codes import ExitCode
from dsplan.errors import UserError, excerpt, one_line, shorten
from dsplan.inputs.hardware import MAX_GPUS_PER_NODE, MAX_NODES


# ---------------------------------------------------------------- bounded number types
class BoundedInt(click.IntRange):
    """An integer between ``min`` and ``max``: plain decimal digits only, at most 24 characters,
    so a 5,000-digit or ``1e19`` value is refused in one short line that names the range."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and (len(value) > 24 or not re.fullmatch(r"\s*[+-]?[0-9]+\s*", value, re.ASCII)):
            self.fail(f"{excerpt(value)} is not a whole number in the range {self._describe_range()}", param, ctx)
        return super().convert(value, param, ctx)


_DECIMAL_RE = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)


class FiniteFloat(click.FloatRange):
    """A finite number in a range, written in plain ASCII decimal: ``nan``, ``inf``, ``1e400``
    and over-long text are refused."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and (len(value) > 32 or not _DECIMAL_RE.fullmatch(value)):
            self.fail(f"{excerpt(value)} is not a finite number in the range {self._describe_range()}", param,
                      ctx)
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{excerpt(value)} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


# ---------------------------------------------------------------- shared options
_HARDWARE_OPTIONS = (
    click.option("--preset", metavar="NAME", help="Hardware preset (see `dsplan presets list`); flags override it."),
    click.option("--gpus", metavar="SPEC", help="GPUs as COUNTxMEM (8x64G, 1x24GB) or NODESxCOUNTxMEM (2x8x80G)."),
    click.option("--backend", type=click.Choice(["cuda", "rocm", "dcu"], case_sensitive=False), default=None,
                 help="GPU software stack; dcu = Hygon DCU on ROCm/DTK.  [default: cuda]"),
    click.option("--host-ram", metavar="SIZE", help="Host RAM per node, e.g. 512G (needed to judge offload tiers)."),
    click.option("--gpu-name", metavar="NAME", help="GPU model (A100, H100, V100, 4090, K100, MI300X, ...): decides bf16."),
    click.option("--method", type=click.Choice(["lora", "qlora", "full", "freeze"]), default=None,
                 help="Fine-tuning method.  [default: from the YAML, else lora]"),
    click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
                 help="Training precision.  [default: bf16 where the GPU has it, else fp16; fp32 trains on a CPU "
                      "with any DeepSpeed]"),
)
#: Flags that only `render` takes (the others plan or run in folders of their own).
_RENDER_ONLY = ("output_dir",)


def _lf_option(key):
    """A click option for one LLaMA-Factory key of the schema; its help is the key's help."""
    param = "model" if key.field == "model_name_or_path" else key.field
    typ = BoundedInt(min=key.minimum, max=key.maximum) if key.type is int else None
    metavar = "DIR|NAME" if param == "model" else None
    return click.option(key.flag, param, type=typ, metavar=metavar, help=f"{key.help}  [YAML: {key.name}]")


def input_options(command: str):
    """Hardware flags, --method and every LF key with a flag in the schema, for ``command``."""
    from dsplan.schema.lf import FLAGGED

    options = list(_HARDWARE_OPTIONS)
    options += [_lf_option(k) for k in FLAGGED if command == "render" or k.field not in _RENDER_ONLY]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def resolve_inputs(lf_yaml, options: dict):
    """Hardware profile, model spec, merged settings and the user's YAML, from the command's options."""
    from dsplan.inputs.request import Request, resolve

    return resolve(Request.from_options(lf_yaml, options))


class DsplanGroup(click.Group):
    """Turns every user error into one line and exit code 2 (``ExitCode.USAGE``)."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except UserError as e:
            click.echo(f"dsplan: error: {one_line(str(e))}", err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:
            if type(e).__name__.startswith("NoArgsIsHelp"):  # bare `dsplan` / `dsplan render`: show help
                click.echo(e.ctx.get_help() if e.ctx else e.format_message())
                sys.exit(ExitCode.SUCCESS)
            msg = " ".join(e.format_message().split())
            cmd = f" {e.ctx.command_path.split(' ', 1)[-1]}" if e.ctx and " " in e.ctx.command_path else ""
            click.echo(one_line(f"dsplan{cmd}: error: {msg} (see --help)"), err=True)
            sys.exit(ExitCode.USAGE)
        except click.exceptions.Abort:
            click.echo("dsplan: aborted", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        except click.ClickException as e:
            click.echo(f"dsplan: error: {one_line(' '.join(e.format_message().split()))}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # the last resort: a file operation the system refused, not caught nearer
            click.echo(f"dsplan: error: {os_error_line(e)}", err=True)
            sys.exit(ExitCode.OS_ERROR)
        sys.exit(rv if isinstance(rv, int) else ExitCode.SUCCESS)


def os_error_line(e: OSError) -> str:
    """``<reason>: <file>`` for an ``OSError``, as one line with the file name shortened."""
    why = e.strerror or str(e) or type(e).__name__
    name = e.filename
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return one_line(f"{why}: {shorten(str(name))}" if name is not None else why)


@click.group(cls=DsplanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dsplan")
def cli():
    """dsplan: DeepSpeed + LLaMA-Factory configs that fit the first time."""


# ---------------------------------------------------------------- render
@cli.command()
@click.argument("lf_yaml", required=False, type=click.Path(dir_okay=False))
@input_options("render")
@click.option("--tier", default="all", show_default=True, help="zero2, zero2_offload, zero3, zero3_offload "
              "(alias minimal), or all.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace files an earlier render left in the output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--slurm", is_flag=True, help="Also write dsplan.sbatch: one job over the profile's nodes (one task "
              "per node, every GPU) that runs `dsplan run` once, as the controller of all nodes.")
@click.option("--partition", metavar="NAME", help="Slurm partition (with --slurm).")
@click.option("--time", "time_limit", metavar="TIME", help="Slurm time limit (with --slurm): minutes, HH:MM:SS "
              "or D-HH:MM:SS.")
@click.option("--account", metavar="NAME", help="Slurm account (with --slurm).")
@click.pass_context
def render(ctx, lf_yaml, tier, out_dir, force, as_json, slurm, partition, time_limit, account, **options):
    """Write DeepSpeed JSON per tier and the LLaMA-Factory YAML(s) that use them."""
    from dsplan.emit.render import describe_render, render_plan
    from dsplan.fsutil import write_new_files
    from dsplan.plan.planner import make_plan
    from dsplan.plan.tiers import select_tiers

    if not slurm and any(v is not None for v in (partition, time_limit, account)):
        raise click.UsageError("--partition, --time and --account go with --slurm")
    tiers = select_tiers(tier)
    inputs = resolve_inputs(lf_yaml, options)
    plan = make_plan(inputs.profile, inputs.spec, inputs.settings, data=inputs.data, calibration=inputs.calibration)
    bundle = render_plan(plan, [plan.get(t.name).tier_config() for t in tiers], Path(out_dir), inputs.user)
    files = dict(bundle.files)
    if slurm:
        from dsplan.emit.slurm import SBATCH_NAME, SbatchOptions

        sbatch = SbatchOptions(partition=partition, time=time_limit, account=account, workdir=str(Path.cwd()))
        files[Path(out_dir).resolve() / SBATCH_NAME] = _sbatch_text(ctx, lf_yaml, tier, out_dir, inputs.profile,
                                                                    options.get("preset"), sbatch)
    written = write_new_files(files, overwrite=force)
    if as_json:
        click.echo(json.dumps(bundle.manifest, indent=2))
        return ExitCode.SUCCESS
    for line in describe_render(plan, written, bundle.changes):
        click.echo(line)
    if any(ch.isspace() for ch in str(Path(out_dir).resolve())):
        click.echo("warning: the output path contains whitespace; llamafactory-cli's torchrun launcher splits "
                   "its arguments on spaces, so launch from a path without spaces", err=True)
    return ExitCode.SUCCESS


#: render's own options, which `dsplan run` in the batch script does not take.
_NOT_FOR_RUN = {"lf_yaml", "tier", "out_dir", "force", "as_json", "slurm", "partition", "time_limit", "account",
                *_RENDER_ONLY}


def _run_args(ctx: click.Context, lf_yaml: str | None, tier: str) -> list[str]:
    """`dsplan run`'s arguments for the inputs this render was given (paths made absolute)."""
    args = [str(Path(lf_yaml).resolve())] if lf_yaml else []
    if tier not in (None, "all"):
        args += ["--tier", tier]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or param.name in _NOT_FOR_RUN or value is None or value is False:
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            args.append(flag)
            continue
        if param.name == "model" and Path(str(value)).exists():
            value = str(Path(str(value)).resolve())
        args += [flag, str(value)]
    return args


def _sbatch_text(ctx, lf_yaml, tier, out_dir, profile, preset, sbatch) -> str:
    """`render --slurm`: the same inputs as one `dsplan run` on the batch host."""
    from dsplan.emit.slurm import render_sbatch

    site = None
    if preset:
        from dsplan.inputs.presets import get_preset

        site = get_preset(preset).slurm
    command = [sys.executable, "-m", "dsplan", "run", *_run_args(ctx, lf_yaml, tier),
               "--run-dir", str((Path(out_dir) / "run").resolve())]
    return render_sbatch(profile, command, sbatch, site=site)


# ---------------------------------------------------------------- plan
@cli.command()
@click.argument("lf_yaml", required=False, type=click.Path(dir_okay=False))
@input_options("plan")
@click.option("--tier", default=None, help="Force this tier as the choice (still estimates all four).")
@click.option("--headroom", type=FiniteFloat(0, 0.5, max_open=True), default=0.05, show_default=True,
              help="Fraction of GPU and host memory kept free.")
@click.option("--allow-cutoff", type=BoundedInt(16, 10_000_000), metavar="N",
              help="If nothing fits, allow cutoff_len to shrink down to N.")
@click.option("--allow-qlora", is_flag=True, help="If nothing fits, allow 4-bit QLoRA instead of LoRA.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (schema in README).")
def plan(lf_yaml, tier, headroom, allow_cutoff, allow_qlora, as_json, **options):
    """Estimate every tier's peak memory and pick the fastest that fits."""
    from dsplan.plan.planner import make_plan

    inputs = resolve_inputs(lf_yaml, options)
    result = make_plan(inputs.profile, inputs.spec, inputs.settings, headroom=headroom, tier=tier,
                       allow_cutoff=allow_cutoff, allow_qlora=allow_qlora, data=inputs.data,
                       calibration=inputs.calibration)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        from dsplan.plan.explain import print_plan

        print_plan(result)
    return ExitCode.SUCCESS if result.choice else ExitCode.NOTHING_FITS


# ---------------------------------------------------------------- run
@cli.command()
@click.argument("lf_yaml", required=False, type=click.Path(dir_okay=False))
@input_options("run")
@click.option("--tier", default=None, help="Starting tier (minimal = zero3_offload); default: the plan's choice.")
@click.option("--no-fallback", is_flag=True, help="Stop after an OOM instead of falling back a tier.")
@click.option("--max-attempts", type=BoundedInt(1, 1000), default=6, show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False), default="dsplan-run", show_default=True,
              help="Run folder: one attempt-NNN/ per attempt and attempts.jsonl; a rerun continues from it.")
@click.option("--dry-run", is_flag=True, help="Print the command, environment and files; run nothing.")
@click.option("--lf-cli", metavar="PATH", help="llamafactory-cli to run [default: $DSPLAN_LF_CLI, else PATH].")
@click.option("--stall-timeout", type=FiniteFloat(1, 10_000_000), default=1800, show_default=True,
              help="Seconds with no output and no training step before the watchdog ends the attempt.")
@click.option("--headroom", type=FiniteFloat(0, 0.5, max_open=True), default=0.05, show_default=True)
@click.option("--nnodes", type=BoundedInt(1, MAX_NODES), help="Nodes in the job (multi-node).")
@click.option("--node-rank", type=BoundedInt(0, MAX_NODES - 1), help="This node's rank (multi-node).")
@click.option("--master-addr", help="Rendezvous address (multi-node).")
@click.option("--master-port", type=BoundedInt(1, 65535), help="Rendezvous port.")
@click.option("--cleanup", is_flag=True, help="End the processes a dsplan that died left running from --run-dir "
              "(its processes.json), say what was found, and exit; trains nothing.")
@click.option("--preflight", is_flag=True, help="Before each configuration's real run, a short attempt at the same "
              "tier, knobs and world size on the dataset's longest samples; an OOM there falls back at once.")
@click.option("--preflight-steps", type=BoundedInt(1, 100_000), metavar="N", default=None,
              help="Optimizer steps of each preflight (with --preflight).  [default: 2]")
def run(lf_yaml, tier, no_fallback, max_attempts, run_dir, dry_run, lf_cli, stall_timeout, headroom, nnodes,
        node_rank, master_addr, master_port, cleanup, preflight, preflight_steps, **options):
    """Run llamafactory-cli train; on GPU or host OOM, kill every rank and fall back a tier."""
    from dsplan.launch.loop import RunOptions, cleanup_run_dir, describe_dry_run, resolve_lf_cli
    from dsplan.launch.loop import run as run_loop
    from dsplan.launch.placement import check_node_flags
    from dsplan.plan.planner import make_plan

    _check_run_text(run_dir, lf_cli, master_addr)
    if preflight_steps is not None and not preflight:
        raise click.UsageError("--preflight-steps goes with --preflight")
    if cleanup:
        return cleanup_run_dir(Path(run_dir).resolve(), say=lambda m: click.echo(m, err=True))
    inputs = resolve_inputs(lf_yaml, options)
    check_node_flags(inputs.profile, nnodes, node_rank, master_addr)
    plan = make_plan(inputs.profile, inputs.spec, inputs.settings, headroom=headroom, tier=tier, data=inputs.data,
                     calibration=inputs.calibration)
    cli_path = (lf_cli or os.environ.get("DSPLAN_LF_CLI") or "llamafactory-cli") if dry_run else resolve_lf_cli(lf_cli)
    opts = RunOptions(run_dir=Path(run_dir).resolve(), lf_cli=cli_path, start_tier=tier,
                      max_attempts=max_attempts, fallback=not no_fallback, stall_timeout=stall_timeout,
                      nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port)
    if preflight:  # the data's longest samples, read now: an unreadable dataset stops here (exit 2)
        from dsplan.launch.preflight import DEFAULT_STEPS, load_preflight

        opts.preflight = load_preflight(plan.settings, inputs.user, preflight_steps or DEFAULT_STEPS, cli_path,
                                        profile=inputs.data, say=lambda m: click.echo(m, err=True))
    if not dry_run:
        return run_loop(plan, inputs.user, opts, say=lambda m: click.echo(m, err=True))
    if plan.choice is None and tier is None:
        click.echo("nothing fits this hardware (see `dsplan plan`); pass --tier to try anyway")
        return ExitCode.NOTHING_FITS
    for line in describe_dry_run(plan, opts, dict(os.environ)):
        click.echo(line)
    return ExitCode.SUCCESS


def _check_run_text(run_dir: str, lf_cli: str | None, master_addr: str | None) -> None:
    """The run folder and --lf-cli are printed and written into files: plain text only;
    --master-addr is a host name or address."""
    from dsplan.fsutil import check_path_text

    check_path_text(run_dir, "--run-dir")
    if lf_cli is not None:
        check_path_text(lf_cli, "--lf-cli")
    if master_addr is not None and not re.fullmatch(r"[A-Za-z0-9.:_\[\]%-]{1,255}", master_addr, re.ASCII):
        raise UserError(f"bad --master-addr {excerpt(master_addr)}: expected a host name or IP address")


# ---------------------------------------------------------------- diagnose
@cli.command()
@click.argument("logfile", type=click.Path(dir_okay=False))
@click.option("--exit-code", type=BoundedInt(-255, 255), default=None, help="The run's exit code, if known.")
@click.option("--json", "as_json", is_flag=True, help="Print verdict, evidence, backend, suggestion as JSON.")
def diagnose(logfile, exit_code, as_json):
    """Say whether a training log died of GPU OOM, host OOM or something else, and what to do."""
    from dsplan.logs.diagnose import diagnose_file

    d = diagnose_file(logfile, exit_code=exit_code)
    if as_json:
        click.echo(json.dumps(d.to_json(), indent=2))
    else:
        click.echo(f"verdict: {d.verdict}" + (f" ({d.backend})" if d.backend else ""))
        for line in d.evidence:
            click.echo(f"evidence: {line}")
        click.echo(f"next: {d.suggestion}")
    return ExitCode.SUCCESS


# ---------------------------------------------------------------- report
@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (bytes as integers, null when absent).")
@click.option("--plot", "plot_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Also write a PNG of estimate against measured peak per attempt (needs dsplan[plot]).")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
def report(run_dir, as_json, plot_file, force):
    """Each attempt's estimate beside its measured peak, the error, and what explains the gap."""
    from dsplan.fsutil import check_path_text
    from dsplan.learn.report import load_report, print_report

    if force and plot_file is None:
        raise click.UsageError("--force goes with --plot FILE (it replaces an existing plot file)")
    rep = load_report(run_dir)
    if plot_file is not None:
        from dsplan.learn.plot import write_plot

        check_path_text(plot_file, "--plot")  # its name is printed
        write_plot(rep, Path(plot_file), force=force)  # refuses an existing file before any drawing
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
    else:
        print_report(rep)
        if plot_file is not None:
            click.echo(f"wrote {plot_file}")
    for p in rep.problems:
        click.echo(f"warning: {p}", err=True)
    return ExitCode.SUCCESS


# ---------------------------------------------------------------- calibrate
@cli.command()
@click.argument("model_dir", required=False, type=click.Path())
@click.option("--from", "sources", multiple=True, type=click.Path(), metavar="RUN_DIR|JSONL",
              help="A run folder of `dsplan run` (its attempts.jsonl), or a sample file of scripts/gpu_check.py. "
                   "Repeat --from for more.")
@click.option("--site", metavar="NAME", help="A label for the entries written, such as your cluster's name.")
@click.option("--json", "as_json", is_flag=True, help="Print what was fitted (or traced) as JSON.")
@click.option("--python", "python", metavar="PATH", help="With MODEL_DIR: the interpreter that has torch, "
              "transformers and peft [default: $DSPLAN_TRAIN_PYTHON, else this one].")
@click.option("--layers", type=BoundedInt(1, 100_000), metavar="N",
              help="With MODEL_DIR: trace N decoder layers instead of all (faster, less exact).")
@input_options("calibrate")
def calibrate(model_dir, sources, site, as_json, python, layers, **options):
    """Fit the runtime overhead to measured GPU peaks (--from), or trace a model's exact architecture
    (MODEL_DIR), for plan, render and run.

    --from RUN_DIR: per backend and card; needs 3 finished runs with a measured peak per card for a fit,
    fewer only raise that card's estimates by the worst underestimate seen.  MODEL_DIR [plan flags]:
    needs torch and the model's config.json only; traces one training step of the architecture under
    FakeTensor at ZeRO-2 and ZeRO-3 with these settings and stores the estimate's correction per part,
    which plan uses for this architecture and these settings and names in its "why".  Both write
    $DSPLAN_CALIBRATION, else ~/.config/dsplan/calibration.json, keeping the entries they do not replace."""
    if (model_dir is None) == (not sources):
        raise click.UsageError("give one of MODEL_DIR (trace a model) or --from RUN_DIR (fit the runtime overhead)")
    if model_dir is not None:
        from dsplan.fsutil import check_path_text
        from dsplan.learn.trace import calibrate_command

        if site is not None:
            raise click.UsageError("--site goes with --from")
        check_path_text(model_dir, "MODEL_DIR")
        calibrate_command(model_dir, options, python, layers, as_json, echo=click.echo)
        return ExitCode.SUCCESS
    if python is not None or layers is not None or any(v is not None for v in options.values()):
        raise click.UsageError("--python, --layers and the plan flags go with MODEL_DIR")
    from dsplan.fsutil import check_path_text
    from dsplan.learn.calibration import calibrate as fit_samples
    from dsplan.learn.calibration import describe
    from dsplan.learn.samples import read_samples

    for source in sources:
        check_path_text(source, "--from")  # its name is printed and written into the file
    if site is not None and not re.fullmatch(r"[\w.@+-]{1,64}", site, re.ASCII):
        raise UserError(f"bad --site {excerpt(site)}: use up to 64 letters, digits and . _ - + @")
    found = read_samples(sources)
    results, path = fit_samples(found, site=site)
    if as_json:
        click.echo(json.dumps({"path": str(path), "sources": found.sources,
                               "results": [r.to_json() for r in results]}, indent=2))
    else:
        for line in describe(results, path, found):
            click.echo(line)
    return ExitCode.SUCCESS


# ---------------------------------------------------------------- validate
@cli.command()
@click.argument("targets", nargs=-1, required=True, type=click.Path())
@click.option("--python", "python", metavar="PATH", help="Interpreter that has deepspeed and llamafactory "
              "[default: $DSPLAN_TRAIN_PYTHON, else this one].")
@click.option("--world-size", type=BoundedInt(1, MAX_NODES * MAX_GPUS_PER_NODE),
              help="Override the data-parallel world size.")
@click.option("--strict", is_flag=True, help="Exit 3 when DeepSpeed or LLaMA-Factory is not installed.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def validate(targets, python, world_size, strict, as_json):
    """Check rendered files with DeepSpeed's and LLaMA-Factory's own validators."""
    from dsplan.emit.validate import run_validation
    from dsplan.fsutil import check_path_text

    for t in targets:
        check_path_text(t, "validate target")  # its name is printed
    results, notes = run_validation([Path(t) for t in targets], python=python, world_size=world_size)
    if as_json:
        click.echo(json.dumps({"results": [r.__dict__ for r in results], "notes": notes}, indent=2))
    else:
        for r in results:
            mark = {True: "ok  ", False: "FAIL", None: "skip"}[r.ok]
            validator = "DeepSpeed" if r.kind == "deepspeed" else "LLaMA-Factory"
            click.echo(f"{mark} {Path(r.path).name:28s} {validator}: {r.detail}")
        for n in notes:
            click.echo(f"note: {n}")
    if any(r.ok is False for r in results):
        return ExitCode.FAILED
    if strict and any(r.ok is None for r in results):
        return ExitCode.EXHAUSTED
    return ExitCode.SUCCESS


# ---------------------------------------------------------------- detect
@cli.command()
@click.option("--backend", type=click.Choice(["cuda", "rocm", "dcu"], case_sensitive=False), default=None,
              help="Only ask this backend's tool.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def detect(backend, as_json):
    """Build the hardware profile of this machine (nvidia-smi, rocm-smi or hy-smi, and psutil)."""
    from dsplan.inputs.detect import detect_profile

    profile = detect_profile(backend)
    if as_json:
        click.echo(json.dumps(profile.to_dict(), indent=2))
    else:
        click.echo(f"{profile.describe()}")
        ram = f" --host-ram {profile.host_ram // 1024**3}G" if profile.host_ram else ""
        name = f" --gpu-name {profile.gpu_name}" if profile.gpu_name else ""
        click.echo(f"use: --gpus {profile.spec} --backend {profile.backend}{ram}{name}")
    return ExitCode.SUCCESS


# ---------------------------------------------------------------- demo
@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="dsplan-demo", show_default=True,
              help="Where the tiny model, dataset and run folder go.")
@click.option("--nproc", type=BoundedInt(1, 8), default=None,
              help="Training processes (gloo on the CPU) [default: 2; 1 with --micro-batch].")
@click.option("--micro-batch", "micro_batch", is_flag=True,
              help="The short act instead: one rank, a micro-batch too big for a measured cap falls back to half "
                   "within zero2 (about 1.5 minutes on 2 cores).")
@click.option("--tiers", is_flag=True, hidden=True, help="The tier walk (the default; kept for old scripts).")
@click.option("--lf-cli", metavar="PATH", help="llamafactory-cli to run [default: $DSPLAN_LF_CLI, else PATH].")
def demo(workdir, nproc, micro_batch, tiers, lf_cli):
    """A real fine-tune on the CPU: zero2 dies of a real OOM on one rank, every rank ends, zero3 finishes.

    It measures each tier's per-rank peak on this machine first and caps every rank between
    the two, so the fall back is a real tier change (about 3 minutes on 2 cores)."""
    from dsplan.demo.demo import run_demo, summarize
    from dsplan.launch.loop import resolve_lf_cli

    if micro_batch and tiers:
        raise click.UsageError("--micro-batch and --tiers are two different acts: pick one")
    cli_path = resolve_lf_cli(lf_cli)

    def say(message: str) -> None:
        click.echo(message, err=True)

    if not micro_batch:
        from dsplan.demo.tiers import run_tiers_demo, summarize_tiers

        code, run_dir = run_tiers_demo(Path(workdir), cli_path, nproc=nproc or 2, say=say)
        lines = summarize_tiers(run_dir)
    else:
        code, run_dir = run_demo(Path(workdir), cli_path, nproc=nproc or 1, say=say)
        lines = summarize(run_dir)
    click.echo("")
    for line in lines:
        click.echo(line)
    return code


# ---------------------------------------------------------------- presets
@cli.group()
def presets():
    """Checked-in hardware profiles; add site presets via $DSPLAN_PRESETS."""


@presets.command("list")
@click.option("--json", "as_json", is_flag=True)
def presets_list(as_json):
    """List every preset (built-in and site)."""
    from dsplan.inputs.presets import all_presets

    found, warnings = all_presets()
    if as_json:
        click.echo(json.dumps([{"name": p.name, "description": p.description, "origin": p.origin, **p.hardware}
                               for p in found.values()], indent=2))
    else:
        width = max(len(n) for n in found) if found else 10
        for p in sorted(found.values(), key=lambda p: p.name):
            hw = p.hardware
            flags = f"--gpus {hw['gpus']} --backend {hw.get('backend', 'cuda')}"
            click.echo(f"{p.name:<{width}}  {flags:<34} {p.description}"
                       + ("" if p.origin == "built-in" else f"  [{p.origin}]"))
    for w in warnings:
        click.echo(f"warning: {one_line(w)}", err=True)
    return ExitCode.SUCCESS


@presets.command("show")
@click.argument("name")
def presets_show(name):
    """Show one preset's file."""
    from dsplan.inputs.presets import get_preset
    from dsplan.inputs.reading import MAX_YAML_BYTES, read_text

    p = get_preset(name)
    click.echo(f"# {p.path} ({p.origin})")
    click.echo(read_text(p.path, f"preset {p.path}", MAX_YAML_BYTES).rstrip())
    return ExitCode.SUCCESS


def main():
    cli.main(prog_name="dsplan")


if __name__ == "__main__":
    main()
