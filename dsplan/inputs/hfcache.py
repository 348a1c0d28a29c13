"""Hub ids through the local Hugging Face cache, without the network.

``huggingface_hub`` keeps each downloaded repository under its cache folder as
``models--ORG--NAME/`` with ``refs/main`` (the commit the ``main`` branch pointed
to when it was last fetched) and ``snapshots/<commit>/`` (the files of that
commit, usually links into ``blobs/``).  dsplan reads ``config.json`` from there
and nothing else, so a login node that has pulled a model once (or that has only
its ``config.json`` put in place by hand) can plan for it by hub id.

The cache folder is found the way ``huggingface_hub`` finds it: ``$HF_HUB_CACHE``,
then the older ``$HUGGINGFACE_HUB_CACHE``, then ``$HF_HOME/hub``, then
``$XDG_CACHE_HOME/huggingface/hub``, then ``~/.cache/huggingface/hub``.  The first
of these is where the library (and so LLaMA-Factory at launch) looks; the others
are searched too, since a login node's shell may set them differently.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

from dsplan.errors import UserError
from dsplan.inputs.reading import path_kind, read_text

#: A hub repository id: ``org/name``, each part letters, digits, ``-``, ``_`` or ``.``
#: (as ``huggingface_hub`` validates them), at most 96 characters.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
#: Snapshot folders looked at per repository, at most (a cache holds a handful).
MAX_SNAPSHOTS = 256
#: ``refs/main`` holds one commit hash.
MAX_REF_BYTES = 256


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub repository id (``org/name``)."""
    return bool(_HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text \
        and not text.endswith((".", "-"))


def _expand(value: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError:  # "~someone" with no such user
        return Path(value)


def cache_roots() -> list[Path]:
    """The hub cache folders to search, the one ``huggingface_hub`` uses first."""
    env = os.environ
    roots = [env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE")]
    if env.get("HF_HOME"):
        roots.append(os.path.join(env["HF_HOME"], "hub"))
    xdg = env.get("XDG_CACHE_HOME")
    if xdg:
        roots.append(os.path.join(xdg, "huggingface", "hub"))
    roots.append(os.path.join("~", ".cache", "huggingface", "hub"))
    seen: list[Path] = []
    for root in roots:
        if root and _expand(root) not in seen:
            seen.append(_expand(root))
    return seen


def repo_folder(root: Path, hub_id: str) -> Path:
    """``root/models--ORG--NAME`` for ``ORG/NAME``."""
    return root / ("models--" + hub_id.replace("/", "--"))


def _snapshot_from_ref(repo: Path) -> Path | None:
    """The snapshot ``refs/main`` names, when it holds a config.json."""
    ref = repo / "refs" / "main"
    if path_kind(ref) != "file":
        return None
    try:
        commit = read_text(ref, str(ref), MAX_REF_BYTES).strip()
    except UserError:  # an unreadable ref is as good as none
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{7,64}", commit):
        return None
    snap = repo / "snapshots" / commit
    return snap if path_kind(snap / "config.json") == "file" else None


def _newest_snapshot(repo: Path) -> Path | None:
    """Without a usable ``refs/main``: the most recently changed snapshot with a config.json."""
    try:
        with os.scandir(repo / "snapshots") as it:
            entries = sorted(itertools.islice(it, MAX_SNAPSHOTS), key=lambda e: e.name)
    except (OSError, ValueError):
        return None
    found = []
    for entry in entries:
        cfg = Path(entry.path) / "config.json"
        if path_kind(cfg) == "file":
            try:
                found.append((os.stat(cfg).st_mtime, entry.name, Path(entry.path)))
            except (OSError, ValueError):
                continue
    return max(found)[2] if found else None


def find_config(hub_id: str) -> Path | None:
    """The cached ``config.json`` of ``hub_id`` (``refs/main``'s snapshot first), or None."""
    if not is_hub_id(hub_id):
        return None
    for root in cache_roots():
        repo = repo_folder(root, hub_id)
        if path_kind(repo) != "dir":
            continue
        snap = _snapshot_from_ref(repo) or _newest_snapshot(repo)
        if snap is not None:
            return snap / "config.json"
    return None


def where_to_put(hub_id: str) -> str:
    """Where a config.json for ``hub_id`` would be found (in the cache ``huggingface_hub`` uses)."""
    return str(repo_folder(cache_roots()[0], hub_id) / "snapshots" / "main" / "config.json")
