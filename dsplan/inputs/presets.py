"""Hardware presets: checked-in YAML profiles plus sensible training defaults.

Built-in presets ship in ``presets/`` (inside the wheel).  A cluster admin adds
site presets by dropping ``NAME.yaml`` files into a folder named by
``$DSPLAN_PRESETS`` (several folders: separate with ``:``), or into the user's
config folder ``$XDG_CONFIG_HOME/dsplan/presets`` (``~/.config/dsplan/presets``).
Later sources win: a site preset with a built-in's name replaces it.

Precedence when a preset is used: command-line flags > the user's LF YAML >
the preset's ``training`` defaults > dsplan's defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsplan.errors import UserError
from dsplan.fsutil import resource_dir
from dsplan.schema.lf import BY_PRESET

_TOP_KEYS = {"name", "description", "hardware", "training", "sources", "notes"}
_HW_KEYS = {"gpus", "backend", "gpu_name", "host_ram"}
_TRAIN_KEYS = frozenset(BY_PRESET)  # the schema says which LF keys a preset may set


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hardware: dict
    training: dict = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    origin: str = "built-in"  # "built-in" or the site folder
    path: str = ""


def preset_dirs() -> list[tuple[str, Path]]:
    """(origin, folder) in increasing priority."""
    dirs = [("built-in", resource_dir("presets"))]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    dirs.append(("user config", config_home / "dsplan" / "presets"))
    for d in filter(None, os.environ.get("DSPLAN_PRESETS", "").split(os.pathsep)):
        dirs.append(("$DSPLAN_PRESETS", Path(d).expanduser()))
    return dirs


def parse_preset(path: Path, origin: str) -> Preset:
    """Read and check one preset file; every problem is a one-line UserError."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"preset {path}: malformed YAML{where}") from None
    except OSError as e:
        raise UserError(f"preset {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"preset {path}: expected a mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UserError(f"preset {path}: unknown key(s) {', '.join(sorted(unknown))}")
    hw = data.get("hardware")
    if not isinstance(hw, dict) or "gpus" not in hw:
        raise UserError(f"preset {path}: needs hardware.gpus")
    bad = set(hw) - _HW_KEYS
    if bad:
        raise UserError(f"preset {path}: unknown hardware key(s) {', '.join(sorted(bad))}")
    training = data.get("training") or {}
    bad = set(training) - _TRAIN_KEYS if isinstance(training, dict) else {"(not a mapping)"}
    if bad:
        raise UserError(f"preset {path}: unknown training key(s) {', '.join(sorted(bad))}")
    name = str(data.get("name") or path.stem)
    if name != path.stem:
        raise UserError(f"preset {path}: name {name!r} differs from the file name")
    return Preset(
        name=name,
        description=str(data.get("description", "")),
        hardware={k: str(v) for k, v in hw.items()},
        training=dict(training),
        sources=tuple(str(s) for s in data.get("sources") or ()),
        origin=origin,
        path=str(path),
    )


def all_presets(strict: bool = False) -> tuple[dict[str, Preset], list[str]]:
    """Every preset by name, and one warning line per unreadable site file (or raise if strict)."""
    found: dict[str, Preset] = {}
    warnings: list[str] = []
    for origin, folder in preset_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.yaml")):
            try:
                found[path.stem] = parse_preset(path, origin)
            except UserError as e:
                if strict or origin == "built-in":
                    raise
                warnings.append(f"skipped: {e}")
    return found, warnings


def get_preset(name: str) -> Preset:
    presets, _ = all_presets()
    if name not in presets:
        raise UserError(f"unknown preset {name!r}: see `dsplan presets list`")
    return presets[name]
