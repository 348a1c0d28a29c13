"""The length cache: what a key holds, and reading and writing entries.

One job: keys that change whenever the lengths would (the data files' size and mtime,
the tokenizer files or the characters rate, the template and options), and best-effort
JSON entries under ``$XDG_CACHE_HOME/dsplan/lengths`` (else ``~/.cache/dsplan/lengths``):
an unreadable entry is a miss, an unwritable folder only costs the next call its time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dsplan.fsutil import atomic_write
from dsplan.inputs.data.lengths import CHARS_PER_TOKEN, TOKENIZER_FILES
from dsplan.inputs.data.sources import Source

#: Bumped when what the cache holds changes meaning.
CACHE_VERSION = 2


# ---------------------------------------------------------------- keys
def stat_files(folder: Path, names) -> list:
    """[path, size, mtime] of each of ``names`` in ``folder`` that exists."""
    out = []
    for name in names:
        try:
            st = os.stat(folder / name)
        except OSError:
            continue
        out.append([str((folder / name).resolve()), st.st_size, st.st_mtime_ns])
    return out


def files_key(sources: list[Source]) -> list:
    """Each source's dataset_info.json entry and its files' stats, as JSON would store them."""
    out = []
    for src in sources:
        entry = {k: v for k, v in src.__dict__.items() if k != "files"}
        stats = [stat_files(p.parent, [p.name]) for p in src.files]
        out.append([entry, stats])
    return json.loads(json.dumps(out, default=str))


def counter_fingerprint(folder: Path | None) -> dict:
    """What a counter's counts depend on, known without loading it (the warm path never imports tokenizers)."""
    return {"tokenizer": stat_files(folder, TOKENIZER_FILES)} if folder else {"chars": CHARS_PER_TOKEN}


def key_digest(key: dict) -> str:
    """The entry's file name: a hash of the key (the entry holds the key itself, checked on read)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------- entries
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dsplan/lengths``, else ``~/.cache/dsplan/lengths``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsplan" / "lengths"


def _cache_path(cache: Path, key: dict) -> Path:
    return cache / f"{key_digest(key)}.json"


def cache_read(cache: Path | None, key: dict) -> dict | None:
    if cache is None:
        return None
    try:
        data = json.loads(_cache_path(cache, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = isinstance(data, dict) and data.get("key") == json.loads(json.dumps(key, default=str))
    return data.get("data") if same else None


def cache_write(cache: Path | None, key: dict, data: dict) -> None:
    """Best effort: a cache that cannot be written only costs the next call its time."""
    if cache is None:
        return
    try:
        text = json.dumps({"key": key, "data": data}, separators=(",", ":"), default=str)
        atomic_write(_cache_path(cache, key), text)
    except (OSError, TypeError, ValueError):
        pass
