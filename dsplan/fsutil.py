"""Writing files atomically, and never over what an earlier run wrote."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from dsplan.errors import UserError


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``,
    so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_new_files(files: dict[Path, str], overwrite: bool = False) -> list[Path]:
    """Write a set of files, each atomically.  Unless ``overwrite``, refuse (before writing
    anything) when any of them already exists."""
    if not overwrite:
        clash = [p for p in files if p.exists()]
        if clash:
            raise UserError(f"{clash[0]} already exists; choose another output folder or pass --force")
    for parent in {p.parent for p in files}:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output folder {parent}: {e.strerror or e}") from None
        if not os.access(parent, os.W_OK):
            raise UserError(f"output folder {parent} is not writable")
    written = []
    for path, text in files.items():
        atomic_write(path, text)
        written.append(path)
    return written


def resource_dir(name: str) -> Path:
    """Folder of shipped data (``templates``/``presets``): inside the installed package
    (the wheel puts them there), or beside the package in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"dsplan installation is missing its {name}/ folder")


def json_objects(lines: Iterable[bytes]) -> Iterator[dict]:
    """The JSON objects of a JSON-lines text, one per line.  Blank lines, lines a crash cut
    short and lines that hold something other than an object are skipped."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line.decode("utf-8", errors="replace"))
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec
