"""Writing files atomically, and never over what an earlier run wrote.

A set of files (one render) is written as one step: every file goes to a temp file
beside its target first, and only when all of them are on disk are they renamed
into place; on any error the temps, and the folders the call created, are removed.
Paths that dsplan writes into YAML or prints are checked to be plain text first.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from dsplan.errors import UserError, excerpt


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` via a temp file in the same folder and
    ``os.replace``, so a reader never sees a half-written file.  The file gets the usual mode
    (0666 less the umask), not the temp file's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process's umask, read from /proc so no other thread ever sees it changed; else set and restore."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_path_text(text: str, what: str) -> None:
    """Refuse a path that cannot be written into a YAML file, or printed, and read back as the
    same path: one with a control character or line break, or with bytes that are not UTF-8."""
    bad = next((ch for ch in text if not ch.isprintable() and ch != " "), None)
    if bad is not None:
        kind = "a byte that is not UTF-8" if "\udc80" <= bad <= "\udcff" else f"the character {bad!r}"
        raise UserError(f"{what} {excerpt(text)} contains {kind}; rename it (dsplan prints this path and "
                        "writes it into files, which needs plain text)")


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        raise UserError(f"cannot use {excerpt(str(path))}: {getattr(e, 'strerror', None) or e}") from None
    return True


def _make_folders(folders: Iterable[Path]) -> list[Path]:
    """Create the missing ``folders`` (and their missing parents); returns those created, deepest last."""
    created: list[Path] = []
    for folder in sorted(set(folders), key=lambda p: len(p.parts)):
        missing = []
        p = folder
        while not _exists(p):
            missing.append(p)
            p = p.parent
        for m in reversed(missing):
            try:
                m.mkdir()
            except OSError as e:
                _remove_folders(created)
                raise UserError(f"cannot create output folder {excerpt(str(m))}: {e.strerror or e}") from e
            created.append(m)
    return created


def _remove_folders(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


def _write_temps(data: dict[Path, bytes]) -> dict[Path, str]:
    """Each file's bytes in a temp file beside it, fsynced, with the usual mode (0666 less the
    umask, not mkstemp's 0600); returns {path: temp}.  On failure the temps written so far are
    removed and the error is raised."""
    temps: dict[Path, str] = {}
    mode = 0o666 & ~_umask()
    try:
        for path, blob in data.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps[path] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
    except BaseException:
        _unlink_all(temps.values())
        raise
    return temps


def _unlink_all(paths: Iterable[str | Path]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def write_new_files(files: dict[Path, str], overwrite: bool = False) -> list[Path]:
    """Write a set of files as one step: all of them, or (on any error) none, with the folders
    this call created removed again.  Unless ``overwrite``, refuse (before writing anything)
    when any of them already exists.  Errors are one-line UserErrors, the OSError their cause."""
    try:
        data = {path: text.encode("utf-8") for path, text in files.items()}
    except UnicodeEncodeError as e:
        raise UserError(f"cannot write {excerpt(e.object[e.start:e.end])} as UTF-8") from None
    existed = {p for p in files if _exists(p)}
    if existed and not overwrite:
        clash = next(p for p in files if p in existed)
        raise UserError(f"{clash} already exists; choose another output folder or pass --force")
    created = _make_folders(p.parent for p in files)
    for parent in {p.parent for p in files}:
        if not os.access(parent, os.W_OK):
            _remove_folders(created)
            raise UserError(f"output folder {parent} is not writable")
    try:
        temps = _write_temps(data)
    except OSError as e:
        _remove_folders(created)
        raise UserError(f"cannot write to {excerpt(str(next(iter(files)).parent))}: {e.strerror or e}") from e
    done: list[Path] = []
    try:
        for path, tmp in temps.items():
            os.replace(tmp, path)
            done.append(path)
    except OSError as e:  # a rename within one folder: only a vanished folder gets here
        _unlink_all([*temps.values(), *(p for p in done if p not in existed)])
        _remove_folders(created)
        raise UserError(f"cannot write {excerpt(str(path))}: {e.strerror or e}") from e
    return done


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
