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

from dsplan.errors import UserError, excerpt, shorten
from dsplan.fsutil import resource_dir
from dsplan.inputs.reading import path_kind, read_yaml
from dsplan.schema.lf import BY_PRESET
from dsplan.schema.slurm import check_site

_TOP_KEYS = {"name", "description", "hardware", "training", "slurm", "sources", "notes"}
_HW_KEYS = {"gpus", "backend", "gpu_name", "host_ram"}
_TRAIN_KEYS = frozenset(BY_PRESET)  # the schema says which LF keys a preset may set


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hardware: dict
    training: dict = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    slurm: dict = field(default_factory=dict)  # site lines for `render --slurm` (dsplan.schema.slurm)
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
    where = f"preset {shorten(str(path), 120)}"
    data = read_yaml(path, where)
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping")
    unknown = set(map(str, data)) - _TOP_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {excerpt(', '.join(sorted(unknown)))}")
    hw = data.get("hardware")
    if not isinstance(hw, dict) or "gpus" not in hw:
        raise UserError(f"{where}: needs hardware.gpus")
    bad = set(map(str, hw)) - _HW_KEYS
    if bad:
        raise UserError(f"{where}: unknown hardware key(s) {excerpt(', '.join(sorted(bad)))}")
    if any(isinstance(v, bool) for v in hw.values()):
        raise UserError(f"{where}: hardware values must be plain strings or numbers")
    hardware = {k: _text(v, where) for k, v in hw.items()}
    training = data.get("training") or {}
    bad = set(map(str, training)) - _TRAIN_KEYS if isinstance(training, dict) else {"(not a mapping)"}
    if bad:
        raise UserError(f"{where}: unknown training key(s) {excerpt(', '.join(sorted(bad)))}")
    for key, value in training.items():
        BY_PRESET[key].check(value, f"{where}: training")
    name = _text(data.get("name") or path.stem, where)
    if name != path.stem:
        raise UserError(f"{where}: name {excerpt(name)} differs from the file name")
    sources = data.get("sources") or []
    return Preset(
        name=name,
        description=_text(data.get("description", ""), where),
        hardware=hardware,
        training=dict(training),
        sources=tuple(_text(s, where) for s in (sources if isinstance(sources, list) else [sources])),
        slurm=_site(data.get("slurm"), where),
        origin=origin,
        path=str(path),
    )


def _site(block, where: str) -> dict:
    """The preset's ``slurm:`` block, checked; problems name the preset file."""
    if block is not None and not isinstance(block, dict):
        raise UserError(f"{where}: slurm must be a mapping")
    try:
        return check_site(block)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _text(value, where: str) -> str:
    """A preset's text (name, description, a source, a hardware value): one printable line."""
    text = str(value) if isinstance(value, (str, int, float)) else None
    if text is None or not text.isprintable():
        raise UserError(f"{where}: names, descriptions, sources and hardware values must be single lines "
                        "of text")
    return text


def all_presets(strict: bool = False) -> tuple[dict[str, Preset], list[str]]:
    """Every preset by name, and one warning line per unreadable site file (or raise if strict)."""
    found: dict[str, Preset] = {}
    warnings: list[str] = []
    for origin, folder in preset_dirs():
        if path_kind(folder) != "dir":
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
        raise UserError(f"unknown preset {excerpt(name)}: see `dsplan presets list`")
    return presets[name]
