"""Render the sbatch script that runs ``dsplan run`` as the controller of a multi-node Slurm job.

The script asks for whole nodes as the hardware profile describes them (node
count, every GPU, the CPUs and memory of each node, one task per node), adds the
site's lines from the preset (modules, exported variables, raw set-up lines,
extra ``#SBATCH`` options), and execs the given ``dsplan run`` command once on
the batch host.  The template holds the layout; this module decides every value
and shell-quotes each one.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional, Sequence

from dsplan import __version__
from dsplan.errors import UserError
from dsplan.fsutil import resource_dir
from dsplan.inputs.hardware import HardwareProfile
from dsplan.schema.slurm import SITE_KEYS, check_site
from dsplan.schema.slurm import one_line_text as _text
from dsplan.units import GiB

SBATCH_NAME = "dsplan.sbatch"

#: The gres name per backend when the site does not say: Hygon DCU sites count cards as ``dcu``.
DEFAULT_GRES = {"cuda": "gpu", "rocm": "gpu", "dcu": "dcu"}
#: Slurm's --time forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}){0,2})$")


@dataclass(frozen=True)
class SbatchOptions:
    """What the user chose on the command line (``dsplan render --slurm``)."""

    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    job_name: str = "dsplan"
    workdir: Optional[str] = None  # --chdir; the submit folder when None
    output: str = "slurm-%x-%j.out"  # relative to workdir


def _resource_options(profile: HardwareProfile, site: dict) -> tuple[list[str], list[str]]:
    """``#SBATCH`` options for whole nodes as the profile describes them, and notes about them."""
    options = [f"--nodes={profile.nodes}", "--ntasks-per-node=1"]
    notes = []
    gres = site.get("gres", DEFAULT_GRES[profile.backend])
    if gres:
        options.append(f"--gres={gres}:{profile.gpus_per_node}")
    if profile.cpu_cores:
        options.append(f"--cpus-per-task={profile.cpu_cores}")
    if site.get("exclusive", True):
        options.append("--exclusive")  # every CPU of the node, even when the profile does not count them
    mem = site.get("mem")
    options.append(f"--mem={mem if mem is not None else 0}")
    if mem is None:
        ram = f"{profile.host_ram / GiB:.0f} GiB per node in the profile; " if profile.host_ram else ""
        notes.append(f"--mem=0: all of each node's memory ({ram}a node's RealMemory is below its RAM, "
                     "so asking for the exact figure would never be granted)")
    return options, notes


def sbatch_options(profile: HardwareProfile, opts: SbatchOptions, site: dict) -> tuple[list[str], list[str]]:
    """Every ``#SBATCH`` option, each shell-quoted after its ``=``, and the notes to print below them."""
    if opts.time is not None and not _TIME_RE.match(str(opts.time)):
        raise UserError(f"--time {opts.time!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    pairs = [("--job-name", opts.job_name)]
    pairs += [(flag, value) for flag, value in (("--partition", opts.partition), ("--account", opts.account),
                                                ("--time", opts.time), ("--chdir", opts.workdir)) if value]
    pairs.append(("--output", opts.output))
    options = [f"{flag}={shlex.quote(_text(value, flag))}" for flag, value in pairs]
    resources, notes = _resource_options(profile, site)
    return options + resources + site["sbatch"], notes


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template("sbatch.sh.j2")


def render_sbatch(profile: HardwareProfile, command: Sequence[str], opts: SbatchOptions = SbatchOptions(),
                  site: Optional[Mapping] = None) -> str:
    """The script's text.  ``command`` is the controller's argv (``[python, "-m", "dsplan",
    "run", ...]``); ``site`` is the preset's ``slurm:`` block (see :data:`SITE_KEYS`).
    ``setup`` lines are the site's own shell and go in as written; everything else is quoted."""
    if not command:
        raise ValueError("render_sbatch needs the command to run")
    site = check_site(site)
    options, notes = sbatch_options(profile, opts, site)
    return _template().render(
        version=__version__, hardware=" ".join(profile.describe().split()), script_name=SBATCH_NAME,
        options=options, notes=notes, setup=site["setup"], modules=[shlex.quote(m) for m in site["modules"]],
        exports=[f"{k}={shlex.quote(v)}" for k, v in site["env"].items()],
        command=" ".join(shlex.quote(_text(a, "command")) for a in map(str, command)))
