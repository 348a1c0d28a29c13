"""The Slurm side of a preset: its optional ``slurm:`` block, checked once when the preset is read.

The block holds what a site adds to every batch script: the generic resource name
(``gres``), ``--mem``, whole nodes (``exclusive``), extra ``#SBATCH`` options,
modules to load, environment variables and setup lines.  ``dsplan.emit.slurm``
writes them into the script.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

from dsplan.errors import UserError

#: The keys a preset's optional ``slurm:`` block may hold.
SITE_KEYS = ("gres", "mem", "exclusive", "sbatch", "modules", "env", "setup")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GRES_RE = re.compile(r"^[A-Za-z][\w.-]*(:[\w.-]+)?$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")


def one_line_text(value, what: str) -> str:
    """A value for one line of the script: a non-empty string without control characters."""
    text = str(value)
    if not text or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise UserError(f"{what}: expected one line of text, got {text!r}")
    return text


def _strings(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise UserError(f"preset slurm.{what}: expected a list of strings")
    return [one_line_text(v, f"preset slurm.{what}") for v in value]


def check_site(site: Optional[Mapping]) -> dict:
    """The preset's ``slurm:`` block, checked: unknown keys and wrong types are UserErrors."""
    site = dict(site or {})
    unknown = set(site) - set(SITE_KEYS)
    if unknown:
        raise UserError(f"preset slurm: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(SITE_KEYS)})")
    gres = site.get("gres")
    if gres not in (None, False) and not _GRES_RE.match(str(gres)):
        raise UserError(f"preset slurm.gres: expected a name such as gpu, dcu or gpu:a100, got {gres!r}")
    mem = site.get("mem")
    if mem is not None and not _MEM_RE.match(str(mem)):
        raise UserError(f"preset slurm.mem: expected Slurm's --mem form such as 0, 500G or 480000M, got {mem!r}")
    env = site.get("env") or {}
    if not isinstance(env, Mapping) or not all(_NAME_RE.match(str(k)) for k in env):
        raise UserError("preset slurm.env: expected a mapping of variable names to values")
    for key in ("sbatch", "modules", "setup"):
        site[key] = _strings(site.get(key), key)
    bad = [o for o in site["sbatch"] if not o.startswith("-")]
    if bad:
        raise UserError(f"preset slurm.sbatch: expected options such as --qos=normal, got {bad[0]!r}")
    site["env"] = {str(k): one_line_text(v, f"preset slurm.env.{k}") for k, v in env.items()}
    return site
