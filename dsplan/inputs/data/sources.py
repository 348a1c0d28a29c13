"""Where the rows are, and reading them: the first stage of the flow.

One job: turn a :class:`~dsplan.inputs.data.spec.DataSpec`'s dataset names into
:class:`Source` entries the way LF 0.9.5 does (``dataset_dir/dataset_info.json``, its
columns/tags mappings), find each one's files (under ``dataset_dir``, or in the local HF
``datasets``/hub caches for a hub dataset), and read their rows from json, jsonl, csv,
text, parquet or arrow files as plain dicts.  A dataset that is not here to read (a hub
dataset outside the local caches, ``REMOTE:``, a script, parquet without pyarrow) is a
one-line note, and so is a ``dataset_dir`` without dataset_info.json (the data may live
where the training runs); one LF will surely refuse (not in dataset_info.json, a file it
names that is missing, a ranking dataset for another stage, ...) raises
:class:`~dsplan.inputs.data.spec.Refused`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dsplan.errors import UserError, excerpt, shorten
from dsplan.inputs.data.spec import LF_REFUSES, DataSpec, Refused
from dsplan.inputs.reading import path_kind, read_json


# ---------------------------------------------------------------- dataset_info.json -> sources
_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
            "messages": "conversations", "system": None, "tools": None, "images": None, "videos": None,
            "audios": None, "chosen": None, "rejected": None, "kto_tag": None}
_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
         "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
#: File extension -> the loader LF hands it to (LF's FILEEXT2TYPE).
_EXT_KIND = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}


@dataclass
class Source:
    """One named dataset as LF's DatasetAttr describes it, plus the files it reads."""

    name: str
    load_from: str  # "file" or a hub ("hf_hub", "ms_hub", "om_hub"); "script"/"cloud_file" are not read
    target: str  # file or folder name under dataset_dir, or the hub id
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns: dict = field(default_factory=lambda: dict(_COLUMNS))
    tags: dict = field(default_factory=lambda: dict(_TAGS))
    files: list[Path] = field(default_factory=list)
    kind: str = "json"


def resolve(spec: DataSpec) -> tuple[list[Source] | None, list[str]]:
    """The named datasets with their local files; None (and the reason) when any is not here
    to read.  Raises :class:`Refused` for data LF will surely refuse."""
    names = spec.names
    if not names:
        return None, ["planned at cutoff_len: no dataset named"]
    _check_max_samples(spec.max_samples)
    if spec.stage == "ppo":
        return None, ["planned at cutoff_len: ppo generates its responses, their length is not in the data"]
    info, note = _dataset_info(spec)
    if note:
        return None, [note]
    sources = []
    for name in names:
        if info is not None and name not in info:
            raise Refused(f"{name!r} is not in {_info_path(spec)}: {LF_REFUSES}")
        if info is not None and not isinstance(info[name], dict):
            raise Refused(f"{_info_path(spec)}: the entry {name!r} is not a mapping: {LF_REFUSES}")
        src = _source(name, info[name] if info is not None else {"hf_hub_url": name})
        _check_stage(src, spec)
        note = _locate(src, spec)
        if note:
            return None, [note]
        sources.append(src)
    return sources, []


def _check_max_samples(value) -> None:
    """LF compares ``max_samples`` with the row count as it is (``min(max_samples, len(dataset))``):
    anything but an integer stops its loader."""
    if value is not None and not isinstance(value, int):
        raise Refused(f"max_samples {excerpt(value, 40)} is not an integer: {LF_REFUSES}")


def _info_path(spec: DataSpec) -> str:
    return shorten(os.path.join(spec.dataset_dir, "dataset_info.json"), 120)


def _dataset_info(spec: DataSpec) -> tuple[dict | None, str | None]:
    """The parsed dataset_info.json (None: ONLINE, every name is a hub id), or a note when it is
    not here: no such file (the data folder may live where the training runs, not where dsplan
    plans).  One that is here but does not parse as a mapping stops LF's get_dataset_list: :class:`Refused`."""
    if spec.dataset_dir == "ONLINE":
        return None, None
    if spec.dataset_dir.startswith("REMOTE:"):
        return None, "planned at cutoff_len: dataset_info.json is on the hub (REMOTE:), not local"
    path = os.path.join(spec.dataset_dir, "dataset_info.json")
    kind = path_kind(path)
    if kind is None:
        return None, f"planned at cutoff_len: {_info_path(spec)} not found here"
    if kind != "file":  # a folder, a FIFO, a link to /dev/zero: LF's open() fails or reads garbage
        raise Refused(f"{_info_path(spec)} is not a regular file: {LF_REFUSES}")
    try:
        info = read_json(path, _info_path(spec))
    except UserError as e:
        raise Refused(f"{e}: {LF_REFUSES}") from None
    if not isinstance(info, dict):
        raise Refused(f"{_info_path(spec)} is not a mapping of dataset entries: {LF_REFUSES}")
    return info, None


def _source(name: str, entry: dict) -> Source:
    """LF's get_dataset_list + DatasetAttr.join for one entry."""
    hub = next((entry[k] for k in ("hf_hub_url", "ms_hub_url", "om_hub_url") if k in entry), None)
    if hub is not None:
        load_from, target = "hf_hub" if "hf_hub_url" in entry else "ms_hub", str(hub)
    elif "script_url" in entry:
        load_from, target = "script", str(entry["script_url"])
    elif "cloud_file_name" in entry:
        load_from, target = "cloud_file", str(entry["cloud_file_name"])
    else:
        load_from, target = "file", str(entry.get("file_name", ""))
    src = Source(name=name, load_from=load_from, target=target,
                 formatting=str(entry.get("formatting") or "alpaca"), ranking=bool(entry.get("ranking", False)),
                 subset=entry.get("subset"), split=str(entry.get("split") or "train"), folder=entry.get("folder"),
                 num_samples=entry.get("num_samples"))
    # LF: a "columns" (or "tags") block replaces every default, unnamed ones become None.
    if isinstance(entry.get("columns"), dict):
        src.columns = {k: entry["columns"].get(k) for k in _COLUMNS}
    if isinstance(entry.get("tags"), dict):
        src.tags = {k: entry["tags"].get(k) for k in _TAGS}
    return src


def _check_stage(src: Source, spec: DataSpec) -> None:
    """LF's _get_merged_dataset: ranking datasets for rm/dpo only, and only ranking datasets there."""
    if src.ranking != spec.pairwise:
        what = "a ranking (pairwise) dataset" if src.ranking else "not a ranking dataset"
        raise Refused(f"{src.name!r} is {what}, and stage {spec.stage}: {LF_REFUSES}")


def _locate(src: Source, spec: DataSpec) -> str | None:
    """Fill ``src.files``/``src.kind``; a note when the files are not here (a hub dataset, a
    script); :class:`Refused` where LF's _load_single_dataset raises (no file, mixed or unknown types)."""
    if src.load_from in ("script", "cloud_file"):
        return f"planned at cutoff_len: {src.name!r} loads through a {src.load_from}, which dsplan does not run"
    if src.load_from == "file":
        files = _local_files(src, spec)
    else:
        files = _hub_files(src)
        if not files:
            return f"planned at cutoff_len: dataset not local ({src.name!r} is {src.target} on the hub)"
    kinds = {_EXT_KIND.get(p.suffix[1:].lower()) for p in files}
    if len(kinds) != 1 or None in kinds:
        msg = f"{src.name!r}: files of one type only ({', '.join(sorted(_EXT_KIND))})"
        if src.load_from == "file":
            raise Refused(f"{msg}: {LF_REFUSES}")
        return f"planned at cutoff_len: {msg}"
    src.files, src.kind = files, kinds.pop()
    return None


def _local_files(src: Source, spec: DataSpec) -> list[Path]:
    """The files of a dataset under ``dataset_dir``: the file it names, or every entry of the
    folder it names (LF takes them all, in listing order).  :class:`Refused` for one that is
    missing, unusable (a name too long, no permission) or not a regular file (a FIFO would
    block the read forever, a device never ends)."""
    path = Path(spec.dataset_dir) / src.target
    kind = path_kind(path)
    if kind is None:
        raise Refused(f"{src.name!r}: {shorten(str(path), 120)} not found: {LF_REFUSES}")
    if kind == "other":
        raise Refused(f"{src.name!r}: {shorten(str(path), 120)} is not a regular file: {LF_REFUSES}")
    if kind == "file":
        return [path]
    try:
        files = [path / n for n in os.listdir(path)]
    except OSError as e:
        why = e.strerror or e
        raise Refused(f"{src.name!r}: cannot list {shorten(str(path), 120)}: {why}: {LF_REFUSES}") from None
    if not files:
        raise Refused(f"{src.name!r}: {shorten(str(path), 120)} is an empty folder: {LF_REFUSES}")
    odd = next((f for f in files if path_kind(f) == "other"), None)
    if odd is not None:
        raise Refused(f"{src.name!r}: {shorten(str(odd), 120)} is not a regular file: {LF_REFUSES}")
    return files


def unreadable_here(sources: list[Source]) -> str | None:
    """A note when this Python lacks what reading a source takes (LF's Python may have it)."""
    for src in sources:
        if src.kind in ("parquet", "arrow") and not _have_pyarrow():
            return f"planned at cutoff_len: install pyarrow to read {src.name!r} ({src.kind})"
    return None


def _have_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def hf_home() -> Path:
    """The local Hugging Face home (``$HF_HOME``, else ``~/.cache/huggingface``)."""
    return Path(os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))


def _snake(name: str) -> str:
    """``datasets``' camelcase_to_snakecase, which names its cache folders."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def _hub_files(src: Source) -> list[Path]:
    """The dataset's files in the local HF caches: the ``datasets`` arrow cache first, then
    the raw files of a hub snapshot.  Empty when neither has it."""
    parts = src.target.split("/")
    if len(parts) == 2:
        cache = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home() / "datasets")
        root = cache / f"{parts[0]}___{_snake(parts[1])}"
        arrows = sorted(glob.glob(str(root / (src.subset or "*") / "*" / "*" / f"*-{src.split}*.arrow")))
        if arrows:
            # several cached builds: keep the newest one's files only
            newest = max({str(Path(a).parent) for a in arrows}, key=os.path.getmtime)
            return [Path(a) for a in arrows if str(Path(a).parent) == newest]
    hub = Path(os.environ.get("HF_HUB_CACHE") or hf_home() / "hub")
    snaps = sorted(glob.glob(str(hub / f"datasets--{src.target.replace('/', '--')}" / "snapshots" / "*")),
                   key=os.path.getmtime)
    for snap in reversed(snaps):
        base = Path(snap) / (src.folder or "")
        found = [p for p in sorted(base.rglob("*")) if p.is_file() and p.suffix[1:].lower() in _EXT_KIND]
        split = [p for p in found if src.split in p.name or src.split in p.parent.name]
        if split or found:
            return split or found
    return []


# ---------------------------------------------------------------- reading rows
def read_source(src: Source, max_samples: int | None) -> list[dict]:
    """``src``'s rows in LF's order, cut to ``max_samples`` (LF applies it per dataset).  Raises
    :class:`Refused` when a column LF's converter reads is in none of the rows."""
    rows: list[dict] = []
    for path in src.files:
        rows.extend(_READERS[src.kind](path))
    _check_columns(src, rows)
    if max_samples is not None:
        rows = rows[: max(0, int(max_samples))]
    return rows


def read_columns(src: Source) -> list[str]:
    """The columns LF 0.9.5's converter for ``src`` indexes on every row (``example[name]``), so a
    dataset without one of them stops LF with a KeyError: every named column of the format, except
    those read only down a branch (chosen/rejected: ranking data only; alpaca's response: not for
    ranking data; sharegpt's system: only where the first message is not a system turn)."""
    c = src.columns
    if src.formatting == "alpaca":
        named = ["prompt", "query", "history", "system", "tools", "kto_tag", "images", "videos", "audios"]
        named += ["chosen", "rejected"] if src.ranking else ["response"]
    else:
        named = ["messages", "tools", "kto_tag", "images", "videos", "audios"]
        named += ["chosen", "rejected"] if src.ranking else []
    return [c[k] for k in named if c.get(k)]


def _check_columns(src: Source, rows: list[dict]) -> None:
    """:class:`Refused` when a column :func:`read_columns` names is in no row (the columns
    ``datasets`` builds are the union of the rows' keys; a row without it reads None, as LF does)."""
    if not rows:
        return
    keys: set = set()
    for row in rows:
        keys.update(row)
    missing = [name for name in read_columns(src) if name not in keys]
    if missing:
        cols = ", ".join(excerpt(m, 40) for m in missing)
        raise Refused(f"{src.name!r} has no column {cols} (LF's {src.formatting} converter reads it from every row, "
                      f"a KeyError); add it, or map its columns in dataset_info.json: {LF_REFUSES}")


def _json_rows(path: Path) -> list[dict]:
    """A JSON file as ``datasets``' json loader sees it: a list of objects, an object of
    columns, or JSON lines."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = _loads(text)
    except ValueError:
        return [r for r in (_loads(line) for line in text.splitlines() if line.strip()) if isinstance(r, dict)]
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        cols = list(data.values())
        if cols and all(isinstance(c, list) and len(c) == len(cols[0]) for c in cols):
            return [dict(zip(data, values)) for values in zip(*cols)]
        return [data]
    return []


def _loads(text: str):
    """``json.loads``; JSON nested past what the parser can recurse into is a ValueError, an
    undecodable file like any other (``datasets``' loader fails on it too)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _csv_rows(path: Path) -> list[dict]:
    csv.field_size_limit(2**31 - 1)  # pandas, which ``datasets`` reads csv with, has no field limit
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _text_rows(path: Path) -> list[dict]:
    return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines()]


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _arrow_rows(path: Path) -> list[dict]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


_READERS = {"json": _json_rows, "csv": _csv_rows, "text": _text_rows, "parquet": _parquet_rows,
            "arrow": _arrow_rows}
