"""The training data's token lengths, and the worst micro-batch they can form.

One job: read the dataset(s) a LLaMA-Factory (LF) run names the way LF 0.9.5 reads them
(``dataset_dir/dataset_info.json``, its columns/tags mappings, alpaca and sharegpt
formats, ``max_samples``), give every sample its token length after the chat template
and truncation to ``cutoff_len``, and sum that up as the padded tokens of the largest
micro-batch plus a length distribution the plan can show.

Three ways to the lengths, best first; :attr:`DataProfile.method` says which one ran:

- ``lf``: LF's own data pipeline (template, tokenizer, truncation) in a subprocess under
  the Python that has LF (:mod:`dsplan.inputs.dataset_worker`).  Exact.
- ``tokenizer``: the model folder's ``tokenizer.json`` through the light ``tokenizers``
  package, with the template rendered from dsplan's copy of LF's template definitions
  (:data:`TEMPLATES`).  An estimate: LF's own code does not run.
- ``chars``: no tokenizer at hand: a characters-per-token rate per script
  (:data:`CHARS_PER_TOKEN`).  A rough estimate.

Data that cannot be read (a hub dataset missing from the local caches, parquet without
pyarrow, a dataset_info.json that does not name it) gives a one-line note and a profile
that plans at ``cutoff_len``, as dsplan did before; it never raises.

Token counts are cached under ``$XDG_CACHE_HOME/dsplan/lengths`` (else
``~/.cache/dsplan/lengths``), keyed by the data files' size and mtime, the tokenizer files,
the template and the options that change the text.  The estimate caches each sample's
per-turn counts, so a new ``cutoff_len`` is arithmetic, not a new tokenization; LF's
lengths are cached per cutoff.

This module runs on login nodes: it never imports torch, transformers, datasets or
llamafactory (``tokenizers`` and, for parquet/arrow, ``pyarrow`` are imported lazily).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from dsplan.errors import UserError, one_line, shorten
from dsplan.fsutil import atomic_write
from dsplan.inputs.reading import read_json

#: Bumped when what the cache holds changes meaning.
CACHE_VERSION = 1
#: LF's collators pad every training batch (SFT, pairwise, KTO) to a multiple of 8.
PAD_MULTIPLE = 8
#: Characters per token used without a tokenizer, by script.  Set on the short side (real
#: BPE vocabularies give about 4 Latin characters a token) so the rough estimate errs
#: toward more memory, not less; digits are one token each, as Qwen's tokenizers split them.
CHARS_PER_TOKEN = {"latin": 3.5, "digit": 1.0, "cjk": 1.0, "other": 2.0}
#: Ways to measure; "auto" takes the best one available.
ENGINES = ("auto", "lf", "tokenizer", "chars")
PAIRWISE_STAGES = ("rm", "dpo")
#: Samples rendered and tokenized per batch (bounds the memory held at once).
_CHUNK = 4096
_WORKER_TAG = "DSPLAN-LENGTHS "


# ---------------------------------------------------------------- what to measure
@dataclass(frozen=True)
class DataSpec:
    """The LF arguments that decide the data's token lengths (LF's defaults where unset)."""

    dataset: str  # comma-separated names in dataset_info.json
    dataset_dir: str = "data"  # absolute, or relative to the current folder as LF reads it
    template: str | None = "default"
    cutoff_len: int = 2048
    stage: str = "sft"
    packing: bool | None = None  # LF: None means on for pt, off otherwise
    neat_packing: bool = False
    max_samples: int | None = None
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    mask_history: bool = False
    tool_format: str | None = None
    default_system: str | None = None
    model_name_or_path: str | None = None  # where the tokenizer is (folder or hub id)

    @classmethod
    def from_lf_args(cls, args: Mapping, base_dir: str | Path | None = None) -> DataSpec:
        """From an LF argument mapping (the user's YAML merged with dsplan's settings);
        a relative ``dataset_dir`` is taken from ``base_dir`` (default: the current folder)."""
        names = args.get("dataset") or ""
        if isinstance(names, (list, tuple)):
            names = ",".join(str(n) for n in names)
        ddir = str(args.get("dataset_dir") or "data")
        if not (ddir == "ONLINE" or ddir.startswith("REMOTE:") or os.path.isabs(ddir)):
            ddir = str(Path(base_dir or os.getcwd()) / ddir)

        def get(key, default):
            value = args.get(key)
            return default if value is None else value

        return cls(dataset=str(names), dataset_dir=ddir, template=args.get("template"),
                   cutoff_len=int(get("cutoff_len", 2048)), stage=str(get("stage", "sft")),
                   packing=args.get("packing"), neat_packing=bool(get("neat_packing", False)),
                   max_samples=args.get("max_samples"), enable_thinking=get("enable_thinking", True),
                   preserve_thinking=bool(get("preserve_thinking", False)),
                   mask_history=bool(get("mask_history", False)), tool_format=args.get("tool_format"),
                   default_system=args.get("default_system"), model_name_or_path=args.get("model_name_or_path"))

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in str(self.dataset).split(",") if n.strip()]

    @property
    def packs(self) -> bool:
        """Whether LF packs samples into ``cutoff_len`` rows (pt packs unless told not to)."""
        return bool(self.neat_packing or (self.packing if self.packing is not None else self.stage == "pt"))

    @property
    def pairwise(self) -> bool:
        return self.stage in PAIRWISE_STAGES

    @property
    def sample_cutoff(self) -> int:
        """The cutoff LF truncates each sample to: one less when packing was asked for
        (LF's DataArguments keeps a slot free so every packed row is ``cutoff_len`` long)."""
        return self.cutoff_len - 1 if (self.packing is True or self.neat_packing) else self.cutoff_len


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class SampleRef:
    """One sample: its dataset's name and its row as LF reads it (after ``max_samples``)."""

    dataset: str
    row: int


@dataclass(frozen=True)
class LengthStats:
    """Token lengths per sample after template and truncation (pairwise: the longer of chosen/rejected)."""

    count: int
    max: int
    p99: int
    median: int
    mean: float
    min: int
    truncated: int  # samples that truncation to cutoff_len cuts
    dropped: int | None  # rows LF drops as malformed for the stage (None: unknown)


@dataclass(frozen=True)
class WorstBatch:
    """The largest micro-batch the data can form, padded as LF's collator pads it."""

    rows: int  # sequences in the batch: micro-batch (pairwise: 2 x micro-batch, chosen + rejected)
    seq_len: int  # every row is padded to this
    tokens: int  # rows x seq_len
    cutoff_tokens: int  # rows x cutoff_len: what planning at cutoff_len assumes
    basis: str  # "data" (longest real sample), "packing" (rows are cutoff_len) or "cutoff" (no data read)


@dataclass(frozen=True)
class DataProfile:
    """What :func:`measure` learnt about the data.  Empty ``lengths`` means it planned at cutoff."""

    spec: DataSpec
    method: str  # "lf" | "tokenizer" | "chars" | "none"
    method_note: str  # one line: how the lengths were measured, and how exact they are
    lengths: tuple[int, ...] = ()  # per sample after truncation (pairwise: chosen)
    rejected: tuple[int, ...] | None = None  # pairwise: rejected, same order as lengths
    truncated: int = 0
    dropped: int | None = None
    rows_read: int | None = None
    longest_untruncated: int | None = None  # before truncation (None where unknown: LF's lengths)
    notes: tuple[str, ...] = ()
    cached: bool = False
    seconds: float = 0.0
    #: (dataset name, rows read, rows dropped) per dataset, in order: maps lengths to rows.
    sources: tuple[tuple[str, int, tuple[int, ...]], ...] | None = field(default=None, repr=False)

    @property
    def exact(self) -> bool:
        return self.method == "lf"

    @property
    def at_cutoff(self) -> bool:
        """No lengths: the plan keeps ``cutoff_len`` (the notes say why)."""
        return not self.lengths

    def row_lengths(self) -> list[int]:
        """Per sample, the length its batch is padded toward (pairwise: the longer of the pair)."""
        if self.rejected is None:
            return list(self.lengths)
        return [max(c, r) for c, r in zip(self.lengths, self.rejected)]

    def stats(self) -> LengthStats | None:
        return _stats(self.row_lengths(), self.truncated, self.dropped) if self.lengths else None

    def worst_batch(self, micro_batch: int) -> WorstBatch:
        return _worst_batch(self, micro_batch)

    def histogram(self, bins: int = 8, width: int = 30) -> list[str]:
        return _histogram(self.row_lengths(), self.spec.cutoff_len, bins, width)

    def longest(self, n: int) -> list[SampleRef]:
        """The ``n`` longest samples, longest first; empty when rows cannot be told apart."""
        return _longest(self, n)

    def to_json(self, micro_batch: int | None = None) -> dict:
        return _profile_json(self, micro_batch)


# ---------------------------------------------------------------- the public entry
def measure(spec: DataSpec, *, python: str | None = None, engine: str = "auto",
            cache_dir: str | Path | None = None, use_cache: bool = True, timeout: float = 1800) -> DataProfile:
    """Token lengths of ``spec``'s data.  ``engine``: "auto" runs LF's own pipeline when
    ``python`` names an interpreter that has llamafactory, else the tokenizer estimate, else
    the characters estimate; "lf"/"tokenizer"/"chars" ask for one (falling back, with a
    note, when it cannot run).  ``python=None`` with "auto" never starts LF: the login-node path."""
    return measure_many([spec], python=python, engine=engine, cache_dir=cache_dir, use_cache=use_cache,
                        timeout=timeout)[0]


def measure_many(specs: list[DataSpec], *, python: str | None = None, engine: str = "auto",
                 cache_dir: str | Path | None = None, use_cache: bool = True,
                 timeout: float = 1800) -> list[DataProfile]:
    """:func:`measure` for several specs (cutoffs, templates, datasets); LF's pipeline, when it
    runs, runs once for all of them in one worker process."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    t0 = time.monotonic()
    cache = None if not use_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    resolved = [_resolve(spec) for spec in specs]
    todo = [(s, r[0]) for s, r in zip(specs, resolved) if r[0] is not None]
    lf_python = python or (sys.executable if engine == "lf" else None)
    hits = {}  # LF's lengths already in the cache, by key digest
    for spec, sources in todo if lf_python and engine in ("auto", "lf") else []:
        key = _lf_key(spec, sources, lf_python)
        data = _cache_read(cache, key)
        if data is not None:
            hits[_digest(key)] = data
    # "auto" asks the interpreter whether it has LF only when the cache cannot answer
    use_lf = engine == "lf" or bool(engine == "auto" and lf_python and (len(hits) == len(todo)
                                                                         or lf_available(lf_python)))
    fresh = _run_lf(lf_python, todo, hits, cache, timeout) if use_lf else {}
    out = []
    for spec, (sources, notes) in zip(specs, resolved):
        if sources is None:
            out.append(_at_cutoff(spec, notes, t0))
            continue
        profile = _measure_lf(spec, sources, lf_python, fresh, hits, notes, t0) if use_lf else None
        out.append(profile or _measure_estimate(spec, sources, engine, cache, notes, t0))
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsplan" / "lengths"


def lf_available(python: str) -> bool:
    """Whether ``python`` can import llamafactory (asked without importing it)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        import importlib.util

        return importlib.util.find_spec("llamafactory") is not None
    code = "import importlib.util as u; print(u.find_spec('llamafactory') is not None)"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip().endswith("True")


def _at_cutoff(spec: DataSpec, notes: list[str], t0: float) -> DataProfile:
    return DataProfile(spec=spec, method="none", method_note=f"planned at cutoff_len {spec.cutoff_len}",
                       notes=tuple(notes), seconds=time.monotonic() - t0)


# ---------------------------------------------------------------- dataset_info.json -> sources
_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
            "messages": "conversations", "system": None, "tools": None, "images": None, "videos": None,
            "audios": None, "chosen": None, "rejected": None, "kto_tag": None}
_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
         "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
#: File extension -> the loader LF hands it to (LF's FILEEXT2TYPE).
_EXT_KIND = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}


@dataclass
class _Source:
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


def _resolve(spec: DataSpec) -> tuple[list[_Source] | None, list[str]]:
    """The named datasets with their local files; None (and the reason) when any cannot be read."""
    names = spec.names
    if not names:
        return None, ["planned at cutoff_len: no dataset named"]
    if spec.stage == "ppo":
        return None, ["planned at cutoff_len: ppo generates its responses, their length is not in the data"]
    info, note = _dataset_info(spec)
    if note:
        return None, [note]
    sources = []
    for name in names:
        if info is not None and name not in info:
            return None, [f"planned at cutoff_len: {name!r} is not in {_info_path(spec)} (LF will refuse it)"]
        src = _source(name, info[name] if info is not None else {"hf_hub_url": name})
        note = _mismatch(src, spec) or _locate(src, spec)
        if note:
            return None, [note]
        sources.append(src)
    return sources, []


def _info_path(spec: DataSpec) -> str:
    return shorten(os.path.join(spec.dataset_dir, "dataset_info.json"), 120)


def _dataset_info(spec: DataSpec) -> tuple[dict | None, str | None]:
    if spec.dataset_dir == "ONLINE":
        return None, None
    if spec.dataset_dir.startswith("REMOTE:"):
        return None, "planned at cutoff_len: dataset_info.json is on the hub (REMOTE:), not local"
    path = os.path.join(spec.dataset_dir, "dataset_info.json")
    if not os.path.isfile(path):
        return None, f"planned at cutoff_len: {_info_path(spec)} not found"
    try:
        info = read_json(path, _info_path(spec))
    except UserError as e:
        return None, f"planned at cutoff_len: {e}"
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        return None, f"planned at cutoff_len: {_info_path(spec)} is not a mapping of dataset entries"
    return info, None


def _source(name: str, entry: dict) -> _Source:
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
    src = _Source(name=name, load_from=load_from, target=target,
                  formatting=str(entry.get("formatting") or "alpaca"), ranking=bool(entry.get("ranking", False)),
                  subset=entry.get("subset"), split=str(entry.get("split") or "train"), folder=entry.get("folder"),
                  num_samples=entry.get("num_samples"))
    # LF: a "columns" (or "tags") block replaces every default, unnamed ones become None.
    if isinstance(entry.get("columns"), dict):
        src.columns = {k: entry["columns"].get(k) for k in _COLUMNS}
    if isinstance(entry.get("tags"), dict):
        src.tags = {k: entry["tags"].get(k) for k in _TAGS}
    return src


def _mismatch(src: _Source, spec: DataSpec) -> str | None:
    if src.ranking != spec.pairwise:
        what = "a ranking (pairwise) dataset" if src.ranking else "not a ranking dataset"
        return f"planned at cutoff_len: {src.name!r} is {what}, and stage {spec.stage} (LF will refuse it)"
    return None


def _locate(src: _Source, spec: DataSpec) -> str | None:
    """Fill ``src.files``/``src.kind``; a note when the files are not here or not readable."""
    if src.load_from in ("script", "cloud_file"):
        return f"planned at cutoff_len: {src.name!r} loads through a {src.load_from}, which dsplan does not run"
    if src.load_from == "file":
        path = Path(spec.dataset_dir) / src.target
        if path.is_dir():
            files = [path / n for n in os.listdir(path)]  # LF takes every entry, in listing order
        elif path.is_file():
            files = [path]
        else:
            return f"planned at cutoff_len: {shorten(str(path), 120)} not found"
    else:
        files = _hub_files(src)
        if not files:
            return f"planned at cutoff_len: dataset not local ({src.name!r} is {src.target} on the hub)"
    kinds = {_EXT_KIND.get(p.suffix[1:].lower()) for p in files}
    if len(kinds) != 1 or None in kinds:
        return f"planned at cutoff_len: {src.name!r}: files of one type only ({', '.join(sorted(_EXT_KIND))})"
    src.files, src.kind = files, kinds.pop()
    return None


def _unreadable_here(sources: list[_Source]) -> str | None:
    """A note when this Python lacks what reading a source takes (LF's Python may have it)."""
    for src in sources:
        if src.kind in ("parquet", "arrow") and not _have_pyarrow():
            return f"planned at cutoff_len: install pyarrow to read {src.name!r} ({src.kind})"
    return None


def _have_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))


def _snake(name: str) -> str:
    """``datasets``' camelcase_to_snakecase, which names its cache folders."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def _hub_files(src: _Source) -> list[Path]:
    """The dataset's files in the local HF caches: the ``datasets`` arrow cache first, then
    the raw files of a hub snapshot.  Empty when neither has it."""
    parts = src.target.split("/")
    if len(parts) == 2:
        cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets")
        root = cache / f"{parts[0]}___{_snake(parts[1])}"
        arrows = sorted(glob.glob(str(root / (src.subset or "*") / "*" / "*" / f"*-{src.split}*.arrow")))
        if arrows:
            # several cached builds: keep the newest one's files only
            newest = max({str(Path(a).parent) for a in arrows}, key=os.path.getmtime)
            return [Path(a) for a in arrows if str(Path(a).parent) == newest]
    hub = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub")
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
def _read_source(src: _Source, max_samples: int | None) -> list[dict]:
    rows: list[dict] = []
    for path in src.files:
        rows.extend(_READERS[src.kind](path))
    if max_samples is not None:
        rows = rows[: max(0, int(max_samples))]
    return rows


def _json_rows(path: Path) -> list[dict]:
    """A JSON file as ``datasets``' json loader sees it: a list of objects, an object of
    columns, or JSON lines."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except ValueError:
        return [r for r in (json.loads(line) for line in text.splitlines() if line.strip()) if isinstance(r, dict)]
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        cols = list(data.values())
        if cols and all(isinstance(c, list) and len(c) == len(cols[0]) for c in cols):
            return [dict(zip(data, values)) for values in zip(*cols)]
        return [data]
    return []


def _csv_rows(path: Path) -> list[dict]:
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


# ---------------------------------------------------------------- LF's converters
@dataclass
class _Conv:
    """A sample in LF's standard form: messages as (role, content)."""

    prompt: list[tuple[str, str]]
    response: list[tuple[str, str]]
    system: str = ""
    tools: str = ""


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _col(row: dict, name: str | None):
    return row.get(name) if name else None


def _alpaca(row: dict, src: _Source) -> _Conv:
    """LF's AlpacaDatasetConverter."""
    c = src.columns
    prompt: list[tuple[str, str]] = []
    history = _col(row, c["history"])
    if isinstance(history, list):
        for turn in history:
            if isinstance(turn, (list, tuple)) and len(turn) == 2:
                prompt += [("user", _text(turn[0])), ("assistant", _text(turn[1]))]
    query = [_text(v) for v in (_col(row, c["prompt"]), _col(row, c["query"])) if v]
    prompt.append(("user", "\n".join(query)))
    tag, chosen, rejected = _col(row, c["kto_tag"]), _col(row, c["chosen"]), _col(row, c["rejected"])
    if isinstance(tag, bool):
        answer, empty = ("assistant", _text(_col(row, c["response"]))), ("assistant", "")
        response = [answer, empty] if tag else [empty, answer]
    elif src.ranking and isinstance(chosen, str) and isinstance(rejected, str):
        response = [("assistant", chosen), ("assistant", rejected)]
    elif isinstance(_col(row, c["response"]), str):
        response = [("assistant", row[c["response"]])]
    else:
        response = []
    return _Conv(prompt, response, _text(_col(row, c["system"])), _text(_col(row, c["tools"])))


def _sharegpt(row: dict, src: _Source) -> _Conv:
    """LF's SharegptDatasetConverter (openai-format data is read the same way: an estimate)."""
    c, t = src.columns, src.tags
    role_of = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["observation_tag"]: "observation",
               t["function_tag"]: "function", t["system_tag"]: "system"}
    accept = ((t["user_tag"], t["observation_tag"]), (t["assistant_tag"], t["function_tag"]))
    messages = _col(row, c["messages"])
    messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else None
    system = _text(_col(row, c["system"]))
    if messages and t["system_tag"] and messages[0].get(t["role_tag"]) == t["system_tag"]:
        system, messages = _text(messages[0].get(t["content_tag"])), messages[1:]
    aligned, broken = [], messages is None
    for i, m in enumerate(messages or []):
        if m.get(t["role_tag"]) not in accept[i % 2]:
            broken = True
            break
        aligned.append((role_of[m.get(t["role_tag"])], _text(m.get(t["content_tag"]))))
    broken = broken or (len(aligned) % 2 == 0) == src.ranking
    conv = _Conv([], [], system, _text(_col(row, c["tools"])))
    tag, chosen, rejected = _col(row, c["kto_tag"]), _col(row, c["chosen"]), _col(row, c["rejected"])
    if broken:
        return conv
    if isinstance(tag, bool):
        empty = ("assistant", "")
        conv.prompt, conv.response = aligned[:-1], aligned[-1:] + [empty] if tag else [empty] + aligned[-1:]
    elif src.ranking and isinstance(chosen, dict) and isinstance(rejected, dict):
        conv.prompt = aligned
        conv.response = [(role_of.get(m.get(t["role_tag"]), "assistant"), _text(m.get(t["content_tag"])))
                         for m in (chosen, rejected)]
    else:
        conv.prompt, conv.response = aligned[:-1], aligned[-1:]
    return conv


def _convert(row: dict, src: _Source) -> _Conv:
    return _alpaca(row, src) if src.formatting == "alpaca" else _sharegpt(row, src)


def _valid(conv: _Conv, stage: str) -> bool:
    """Whether LF's processor for ``stage`` keeps the sample (it drops the others)."""
    if stage == "pt":
        return bool(conv.prompt)
    if stage in ("rm", "dpo", "kto"):
        return len(conv.prompt) % 2 == 1 and len(conv.response) >= 2
    return len(conv.prompt) % 2 == 1 and len(conv.response) == 1


# ---------------------------------------------------------------- LF's chat templates
BOS = ("bos_token",)
EOS = ("eos_token",)


@dataclass(frozen=True)
class Template:
    """dsplan's copy of one LF template: slots are strings with ``{{content}}``, BOS/EOS
    markers, or ("token", name) for a single named token.  ``kind``: "plain", "llama2"
    (the system text joins the first user message) or "reasoning" (empty thought added)."""

    user: tuple
    assistant: tuple
    system: tuple
    function: tuple
    function_format: str
    observation: tuple
    tool_format: str
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    kind: str = "plain"
    thought_words: tuple = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple = ("<tool_call>", "</tool_call>")


def _tpl(user=None, assistant=None, system=None, function=None, observation=None, tools="default", prefix=(),
         default_system="", stop_words=(), efficient_eos=False, replace_eos=False, kind="plain") -> Template:
    """LF's register_template defaults, for dsplan's table."""
    default_slots = ("{{content}}",) if efficient_eos else ("{{content}}", EOS)
    user_slots = tuple(user) if user else ("{{content}}",)
    assistant_slots = tuple(assistant) if assistant else default_slots
    fn_slots, fn_format = function if function else (assistant_slots if assistant else default_slots, "default")
    return Template(user=user_slots, assistant=assistant_slots, system=tuple(system) if system else ("{{content}}",),
                    function=tuple(fn_slots), function_format=fn_format,
                    observation=tuple(observation) if observation else user_slots, tool_format=tools,
                    prefix=tuple(prefix), default_system=default_system, stop_words=tuple(stop_words),
                    efficient_eos=efficient_eos, replace_eos=replace_eos, kind=kind)


_IM_USER = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"
_IM_ASSISTANT = "{{content}}<|im_end|>\n"
_IM_SYSTEM = "<|im_start|>system\n{{content}}<|im_end|>\n"
_QWEN_OBS = "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_QWEN = dict(user=[_IM_USER], assistant=[_IM_ASSISTANT], system=[_IM_SYSTEM], function=([_IM_ASSISTANT], "qwen"),
             observation=[_QWEN_OBS], tools="qwen", stop_words=("<|im_end|>",), replace_eos=True)
_L3_USER = ("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
_L3_OBS = ("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n")
_GEMMA = dict(user=["<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n"],
              assistant=["{{content}}<end_of_turn>\n"], system=["{{content}}\n\n"],
              observation=["<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n"],
              prefix=[BOS], kind="llama2")
_MISTRAL_TOOLS = dict(observation=['[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]'], tools="mistral",
                      prefix=[BOS])
_INTERN2_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language "
    "chosen by the user such as English and 中文."
)

#: The LF 0.9.5 templates dsplan can render on a login node (tests/test_dataset_real.py
#: checks each against LF's own definition).  Media placeholders of the vision
#: templates are not modelled.
TEMPLATES: dict[str, Template] = {
    "empty": _tpl(assistant=["{{content}}"]),
    "default": _tpl(user=["Human: {{content}}", EOS, "\nAssistant:"], assistant=["{{content}}", EOS, "\n"],
                    system=["System: {{content}}", EOS, "\n"]),
    "alpaca": _tpl(user=["### Instruction:\n{{content}}\n\n### Response:\n"], assistant=["{{content}}", EOS, "\n\n"],
                   default_system=("Below is an instruction that describes a task. "
                                   "Write a response that appropriately completes the request.\n\n")),
    "vicuna": _tpl(user=["USER: {{content}} ASSISTANT:"],
                   default_system=("A chat between a curious user and an artificial intelligence assistant. "
                                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")),
    "chatml": _tpl(user=[_IM_USER], assistant=[_IM_ASSISTANT], system=[_IM_SYSTEM],
                   observation=["<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n"],
                   stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    "qwen": _tpl(**_QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen2_vl": _tpl(**_QWEN, default_system="You are a helpful assistant."),
    "qwen3": _tpl(**_QWEN, kind="reasoning"),
    "qwen3_nothink": _tpl(**_QWEN),
    "yi": _tpl(user=[_IM_USER], assistant=[_IM_ASSISTANT], system=[_IM_SYSTEM], stop_words=("<|im_end|>",)),
    "intern2": _tpl(user=[_IM_USER], assistant=[_IM_ASSISTANT], system=[_IM_SYSTEM], prefix=[BOS],
                    default_system=_INTERN2_SYSTEM, stop_words=("<|im_end|>",)),
    "llama2": _tpl(user=[BOS, "[INST] {{content}} [/INST]"], system=["<<SYS>>\n{{content}}\n<</SYS>>\n\n"],
                   kind="llama2"),
    "llama3": _tpl(user=[_L3_USER], assistant=["{{content}}<|eot_id|>"],
                   system=["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"],
                   function=(["{{content}}<|eot_id|>"], "llama3"), observation=[_L3_OBS], tools="llama3",
                   prefix=[BOS], stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True),
    "mistral": _tpl(user=["[INST] {{content}}[/INST]"], assistant=[" {{content}}", EOS], system=["{{content}}\n\n"],
                    function=(["[TOOL_CALLS] {{content}}", EOS], "mistral"), kind="llama2", **_MISTRAL_TOOLS),
    "ministral": _tpl(user=["[INST]{{content}}[/INST]"], system=["{{content}}\n\n"],
                      function=(["[TOOL_CALLS]{{content}}", EOS], "mistral"), kind="llama2",
                      **{**_MISTRAL_TOOLS, "observation": ['[TOOL_RESULTS]{"content": {{content}}}[/TOOL_RESULTS]']}),
    "deepseek": _tpl(user=["User: {{content}}\n\nAssistant:"], system=["{{content}}\n\n"], prefix=[BOS]),
    "deepseek3": _tpl(user=["<｜User｜>{{content}}<｜Assistant｜>"], prefix=[BOS]),
    "deepseekr1": _tpl(user=["<｜User｜>{{content}}<｜Assistant｜>"], prefix=[BOS], kind="reasoning"),
    "gemma": _tpl(**_GEMMA, stop_words=("<end_of_turn>",), replace_eos=True),
    "gemma2": _tpl(**_GEMMA, stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True),
    "glm4": _tpl(user=["<|user|>\n{{content}}<|assistant|>"], assistant=["\n{{content}}"],
                 system=["<|system|>\n{{content}}"], function=(["{{content}}"], "glm4"),
                 observation=["<|observation|>\n{{content}}<|assistant|>"], tools="glm4", prefix=["[gMASK]<sop>"],
                 stop_words=("<|user|>", "<|observation|>"), efficient_eos=True),
    "phi": _tpl(user=["<|user|>\n{{content}}<|end|>\n<|assistant|>\n"], assistant=["{{content}}<|end|>\n"],
                system=["<|system|>\n{{content}}<|end|>\n"], stop_words=("<|end|>",), replace_eos=True),
    "phi4": _tpl(user=["<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>"],
                 assistant=["{{content}}<|im_end|>"], system=["<|im_start|>system<|im_sep|>{{content}}<|im_end|>"],
                 stop_words=("<|im_end|>",), replace_eos=True),
    "falcon": _tpl(user=["User: {{content}}\nFalcon:"], assistant=["{{content}}\n"], efficient_eos=True),
}
#: Stands in for a template dsplan has no copy of (a stated assumption, in the notes).
FALLBACK_TEMPLATE = "chatml"


# ---------------------------------------------------------------- LF's tool formats
_DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)
_QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)
_LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)
_GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)


def _wrap(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _default_tools(tools: list) -> str:
    text, names = "", []
    for tool in tools:
        tool = tool.get("function", "") if tool.get("type") == "function" else tool
        params = ""
        props = tool.get("parameters", {}).get("properties", {})
        for name, p in props.items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(p["enum"])) if p.get("enum") else ""
            items = ", where each item should be {}".format(p["items"].get("type", "")) if p.get("items") else ""
            params += f"  - {name} ({p.get('type', '')}{required}): {p.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
        names.append(tool["name"])
    return _DEFAULT_TOOL_PROMPT.format(tool_text=text, tool_names=", ".join(names))


def _tools_text(fmt: str, tools: list) -> str:
    """LF's ToolUtils.tool_formatter for ``fmt`` (another format: Qwen's, an estimate)."""
    if fmt == "default":
        return _default_tools(tools)
    if fmt == "llama3":
        text = "".join(json.dumps(_wrap(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
        return _LLAMA3_TOOL_PROMPT.format(date=datetime.now().strftime("%d %b %Y"), tool_text=text)
    if fmt == "mistral":
        return "[AVAILABLE_TOOLS] " + json.dumps([_wrap(t) for t in tools], ensure_ascii=False) + "[/AVAILABLE_TOOLS]"
    if fmt == "glm4":
        text = ""
        for t in tools:
            t = t.get("function", "") if t.get("type") == "function" else t
            text += "\n\n## {name}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。".format(
                name=t["name"], body=json.dumps(t, indent=4, ensure_ascii=False))
        return _GLM4_TOOL_PROMPT.format(tool_text=text)
    return _QWEN_TOOL_PROMPT.format(tool_text="".join("\n" + json.dumps(_wrap(t), ensure_ascii=False) for t in tools))


def _calls_text(fmt: str, calls: list[tuple[str, str]]) -> str:
    """LF's ToolUtils.function_formatter: the assistant's tool calls as text."""
    if fmt == "default":
        return "\n".join(f"Action: {name}\nAction Input: {args}" for name, args in calls)
    if fmt == "llama3":
        objs = [{"name": n, "parameters": json.loads(a)} for n, a in calls]
        return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)
    if fmt == "mistral":
        return json.dumps([{"name": n, "arguments": json.loads(a)} for n, a in calls], ensure_ascii=False)
    if fmt == "glm4":
        return f"{calls[0][0]}\n{calls[0][1]}"
    texts = [json.dumps({"name": n, "arguments": json.loads(a)}, ensure_ascii=False) for n, a in calls]
    return "\n".join(f"<tool_call>\n{t}\n</tool_call>" for t in texts)


def _function_text(tpl: Template, content: str) -> str:
    """LF's FunctionFormatter on an assistant tool-call message (JSON it cannot parse stays as text)."""
    start, end = (re.escape(w) for w in tpl.tool_call_words)
    match = re.search(f"{start}(.*?){end}", content, re.DOTALL)
    prefix, body = (content.replace(match.group(0), ""), match.group(1)) if match else ("", content)
    if not match:
        t0, t1 = (re.escape(w) for w in tpl.thought_words)
        thought = re.search(f"{t0}(.*?){t1}", content, re.DOTALL)
        if thought:
            prefix, body = thought.group(0), content.replace(thought.group(0), "")
    try:
        calls = json.loads(body)
        calls = calls if isinstance(calls, list) else [calls]
        pairs = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
        return prefix + _calls_text(tpl.function_format, pairs)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return content


# ---------------------------------------------------------------- rendering a sample
def _apply(slots: tuple, content: str, idx: str = "") -> list:
    out = []
    for slot in slots:
        if isinstance(slot, str):
            slot = slot.replace("{{content}}", content, 1).replace("{{idx}}", idx, 1)
        out.append(slot)
    return out


def _tools_for(tpl: Template, tools: str) -> str:
    try:
        parsed = json.loads(tools)
    except ValueError:
        return tools  # LF would stop here; the estimate counts the text as it is
    if not isinstance(parsed, list) or not parsed:
        return ""
    try:
        return _tools_text(tpl.tool_format, [t for t in parsed if isinstance(t, dict)])
    except (KeyError, TypeError, AttributeError):
        return tools


def _encode(tpl: Template, messages: list[tuple[str, str]], system: str, tools: str) -> list[list]:
    """LF's Template._encode (and Llama2Template's), as element lists per message: strings are
    tokenized one by one, as LF does; markers count one token each."""
    system = system or tpl.default_system
    out = []
    for i, (role, content) in enumerate(messages):
        elements: list = []
        sys_text = ""
        if i == 0:
            elements += list(tpl.prefix)
            if system or tools:
                tool_text = _tools_for(tpl, tools) if tools else ""
                if tpl.kind == "llama2":
                    sys_text = _apply(tpl.system, system + tool_text)[0]
                else:
                    elements += _apply(tpl.system, system + tool_text)
        if role == "user":
            elements += _apply(tpl.user, sys_text + content, str(i // 2))
        elif role == "assistant":
            elements += _apply(tpl.assistant, content)
        elif role == "observation":
            elements += _apply(tpl.observation, content)
        else:  # function
            elements += _apply(tpl.function, _function_text(tpl, content))
        out.append(elements)
    return out


def _remove_thought(tpl: Template, content: str) -> str:
    t0, t1 = (re.escape(w) for w in tpl.thought_words)
    return re.sub(f"{t0}(.*?){t1}", "", content, flags=re.DOTALL).lstrip("\n")


def _has_thought(tpl: Template, content: str) -> bool:
    return tpl.thought_words[0].strip() in content or tpl.thought_words[1].strip() in content


def _multiturn(tpl: Template, conv: _Conv, spec: DataSpec) -> list[list]:
    """LF's encode_multiturn (with ReasoningTemplate's empty-thought rule)."""
    msgs = list(conv.prompt + conv.response)
    if tpl.kind != "reasoning":
        return _encode(tpl, msgs, conv.system, conv.tools)
    discard = spec.mask_history and not spec.preserve_thinking
    for i in range(1, len(msgs), 2):
        if spec.enable_thinking is False or (discard and i < len(msgs) - 2):
            msgs[i] = (msgs[i][0], _remove_thought(tpl, msgs[i][1]))
    enc = _encode(tpl, msgs, conv.system, conv.tools)
    thought = tpl.thought_words[0] + tpl.thought_words[1]
    for i in ([len(msgs) - 2] if discard else range(0, len(msgs), 2)):
        if not _has_thought(tpl, msgs[i + 1][1]):
            if not spec.enable_thinking:
                enc[i] = enc[i] + [thought]
            else:
                enc[i + 1] = [thought] + enc[i + 1]
    return enc


def _oneturn(tpl: Template, prompt: list, answer: tuple, conv: _Conv, spec: DataSpec) -> tuple[list, list]:
    """LF's encode_oneturn: (prompt elements, response elements)."""
    msgs = list(prompt) + [answer]
    if tpl.kind == "reasoning":
        for i in range(1, len(msgs) - 2, 2):
            if not spec.preserve_thinking:
                msgs[i] = (msgs[i][0], _remove_thought(tpl, msgs[i][1]))
        if spec.enable_thinking is False:
            msgs[-1] = (msgs[-1][0], _remove_thought(tpl, msgs[-1][1]))
    enc = _encode(tpl, msgs, conv.system, conv.tools)
    head, tail = [e for part in enc[:-1] for e in part], list(enc[-1])
    if tpl.kind == "reasoning" and not _has_thought(tpl, msgs[-1][1]):
        thought = tpl.thought_words[0] + tpl.thought_words[1]
        if not spec.enable_thinking:
            head.append(thought)
        else:
            tail.insert(0, thought)
    return head, tail


def _parts(conv: _Conv, tpl: Template, spec: DataSpec, eos_text: str, bos: bool) -> list[list]:
    """The element lists whose token counts make a sample's shape (see :func:`_length`)."""
    if spec.stage == "pt":  # LF's PretrainDatasetProcessor: the text plus the eos token's text
        eos_text = "<|end_of_text|>" if spec.template == "llama3" else eos_text
        text = (conv.prompt[0][1] if conv.prompt else "") + eos_text
        return [([BOS] if bos and not spec.packs else []) + [text]]
    if spec.pairwise:
        head, chosen = _oneturn(tpl, conv.prompt, conv.response[0], conv, spec)
        _, rejected = _oneturn(tpl, conv.prompt, conv.response[1], conv, spec)
        extra = [EOS] if tpl.efficient_eos else []
        return [head, chosen + extra, rejected + extra]
    if spec.stage == "kto":
        answer = conv.response[0] if conv.response[0][1] else conv.response[1]
        head, tail = _oneturn(tpl, conv.prompt, answer, conv, spec)
        return [head, tail + ([EOS] if tpl.efficient_eos else [])]
    return _multiturn(tpl, conv, spec)


# ---------------------------------------------------------------- truncation (LF's arithmetic)
def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LF's infer_seqlen: how a (prompt, response) pair is cut to fit ``cutoff_len``."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def _length(shape, stage: str, cutoff: int, efficient_eos: bool, mask_history: bool) -> tuple[int, int, int]:
    """(length, rejected length, untruncated length) of one sample's shape at ``cutoff``.

    Shapes: sft the token count per message; pairwise (prompt, chosen, rejected); kto
    (prompt, response); pt (text,)."""
    if stage == "pt":
        return min(shape[0], cutoff), 0, shape[0]
    if stage in PAIRWISE_STAGES:
        p, c, r = shape
        s, t = infer_seqlen(p, max(c, r), cutoff)
        return s + min(t, c), s + min(t, r), p + max(c, r)
    if stage == "kto":
        s, t = infer_seqlen(shape[0], shape[1], cutoff)
        return s + t, 0, shape[0] + shape[1]
    pairs = list(zip(shape[0::2], shape[1::2]))
    if mask_history:
        pairs.reverse()
    total = 1 if efficient_eos else 0
    for s, t in pairs:
        if total >= cutoff:
            break
        ns, nt = infer_seqlen(s, t, cutoff - total)
        total += ns + nt
    return total, 0, sum(shape) + (1 if efficient_eos else 0)


# ---------------------------------------------------------------- counting tokens
_CJK = re.compile("[\u1100-\u11ff\u2e80-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef]")
_NON_ASCII = re.compile("[^\x00-\x7f]")
_DIGITS = re.compile("[0-9]")
#: Strings that are one token in the templates' vocabularies; the characters estimate counts them so.
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^<>｜]{1,40}｜>|<(?:start|end)_of_turn>|\[/?INST\]|<</?SYS>>"
                      r"|\[/?(?:TOOL_CALLS|TOOL_RESULTS|AVAILABLE_TOOLS|SYSTEM_PROMPT)\]|\[gMASK\]|<sop>|</?s>|<eos>")


class _CharCounter:
    """Token counts from characters: :data:`CHARS_PER_TOKEN` per script, special tokens one each."""

    method = "chars"
    has_bos = True  # unknown without a tokenizer: count the token where a template asks for it
    add_bos = False
    eos_text = "<|endoftext|>"

    def count(self, texts: list[str]) -> list[int]:
        return [self._one(t) for t in texts]

    @staticmethod
    def _one(text: str) -> int:
        specials = len(_SPECIAL.findall(text))
        if specials:
            text = _SPECIAL.sub("", text)
        rate = CHARS_PER_TOKEN
        digits = len(_DIGITS.findall(text))
        cjk = 0 if text.isascii() else len(_CJK.findall(text))
        other = 0 if text.isascii() else len(_NON_ASCII.findall(text)) - cjk
        latin = len(text) - digits - cjk - other
        return specials + math.ceil(latin / rate["latin"] + digits / rate["digit"] + cjk / rate["cjk"]
                                    + other / rate["other"])


class _TokenCounter:
    """Token counts from the model's ``tokenizer.json`` (the ``tokenizers`` package, no torch),
    with the special tokens LF's template adds to the tokenizer added here too."""

    method = "tokenizer"

    def __init__(self, folder: Path, tpl: Template):
        from tokenizers import AddedToken, Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()
        cfg = _tokenizer_config(folder)
        self.has_bos = bool(cfg.get("bos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False)) and self.has_bos
        eos = cfg.get("eos_token") or "<|endoftext|>"
        self.eos_text = tpl.stop_words[0] if tpl.replace_eos and tpl.stop_words else eos
        extra = [w for w in (*tpl.stop_words, self.eos_text) if w]
        self.tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in extra])
        self._encode = getattr(self.tok, "encode_batch_fast", None) or self.tok.encode_batch

    def count(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._encode(texts, add_special_tokens=False)]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _tokenizer_config(folder: Path) -> dict:
    """bos/eos tokens and add_bos_token from tokenizer_config.json (special_tokens_map.json fills gaps)."""
    out: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                data = read_json(path, str(path))
            except UserError:
                continue
            if isinstance(data, dict):
                for key in ("bos_token", "eos_token"):
                    if key in data:
                        out[key] = _token_text(data[key])
                if "add_bos_token" in data:
                    out["add_bos_token"] = bool(data["add_bos_token"])
    return out


def find_tokenizer(model: str | None) -> Path | None:
    """The folder holding ``model``'s tokenizer.json: the model folder itself, or its
    snapshot in the local HF hub cache for a hub id.  None when there is none."""
    if not model:
        return None
    path = Path(model).expanduser()
    if (path / "tokenizer.json").is_file():
        return path
    if path.exists() or model.count("/") != 1:
        return None
    repo = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub") / f"models--{model.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if (snap / "tokenizer.json").is_file():
            return snap
    found = sorted(glob.glob(str(repo / "snapshots" / "*" / "tokenizer.json")), key=os.path.getmtime)
    return Path(found[-1]).parent if found else None


def _load_counter(folder: Path | None, tpl: Template, notes: list[str]):
    """The tokenizer in ``folder``, or None (with a note) when it cannot be loaded; the
    characters counter for no folder."""
    if folder is None:
        return _CharCounter()
    try:
        return _TokenCounter(folder, tpl)
    except ImportError:
        notes.append("the tokenizers package is not installed (pip install tokenizers): lengths from characters")
    except Exception as e:  # a tokenizer.json this tokenizers version cannot load
        notes.append(one_line(f"cannot load {folder / 'tokenizer.json'} ({type(e).__name__}: {e}): "
                              "lengths from characters"))
    return None


def _fingerprint(folder: Path | None) -> dict:
    """What a counter's counts depend on, known without loading it (the warm path never imports tokenizers)."""
    return {"tokenizer": _stat_files(folder, _TOKENIZER_FILES)} if folder else {"chars": CHARS_PER_TOKEN}


# ---------------------------------------------------------------- the estimate (no LF)
def _template(spec: DataSpec, notes: list[str]) -> tuple[str, Template]:
    name = spec.template or ""
    tpl = TEMPLATES.get(name)
    if tpl is None:
        shown = repr(name) if name else "none given (LF would read the tokenizer's chat template)"
        notes.append(f"template {shown}: dsplan has no copy of it; the per-turn overhead of "
                     f"{FALLBACK_TEMPLATE!r} is assumed")
        tpl = TEMPLATES[FALLBACK_TEMPLATE]
    changes = {}
    if spec.tool_format:
        slots = ("{{content}}",) if tpl.efficient_eos else ("{{content}}", EOS)
        changes.update(function=slots, function_format=spec.tool_format, tool_format=spec.tool_format)
    if spec.default_system is not None:
        changes["default_system"] = spec.default_system
    if changes:
        tpl = Template(**{**tpl.__dict__, **changes})
    return name, tpl


def _shapes(rows: list[dict], src: _Source, spec: DataSpec, tpl: Template, counter) -> tuple[list, list[int]]:
    """Per kept row its shape (token counts, see :func:`_length`); and the rows LF drops."""
    shapes: list = []
    dropped: list[int] = []
    for start in range(0, len(rows), _CHUNK):
        parts_of: list[list[list]] = []
        for i, row in enumerate(rows[start:start + _CHUNK], start):
            conv = _convert(row, src)
            if not _valid(conv, spec.stage):
                dropped.append(i)
                continue
            parts_of.append(_parts(conv, tpl, spec, counter.eos_text, counter.add_bos))
        texts = list({e for parts in parts_of for part in parts for e in part if isinstance(e, str) and e})
        counts = dict(zip(texts, counter.count(texts)))
        counts[""] = 0  # LF skips empty strings
        counts[BOS] = 1 if counter.has_bos else 0  # eos and named tokens: one each (LF ensures an eos)
        shapes += [[sum(counts.get(e, 1) for e in part) for part in parts] for parts in parts_of]
    return shapes, dropped


def _measure_estimate(spec, sources, engine, cache, notes, t0) -> DataProfile:
    """The tokenizer (else characters) estimate, from the cache when it has this data."""
    blocked = _unreadable_here(sources)
    if blocked:
        return _at_cutoff(spec, notes + [blocked], t0)
    name, tpl = _template(spec, notes)
    folder = None if engine == "chars" else find_tokenizer(spec.model_name_or_path)
    if folder is None and engine != "chars":
        notes.append(f"no tokenizer.json for {shorten(str(spec.model_name_or_path), 80)!r}: "
                     "lengths from characters per token")
    base = {"v": CACHE_VERSION, "what": "shapes", "files": _files_key(sources), "stage": spec.stage,
            "template": name, "tpl": repr(tpl), "packs": spec.packs, "max_samples": spec.max_samples,
            "thinking": [spec.enable_thinking, spec.preserve_thinking, spec.mask_history]}
    for choice in ([folder, None] if folder else [None]):
        key = {**base, "counter": _fingerprint(choice)}
        data = _cache_read(cache, key)
        if data is not None:
            return _profile(spec, data, tpl, notes, True, t0)
        counter = _load_counter(choice, tpl, notes)
        if counter is None:
            continue  # the tokenizer would not load: count characters instead
        data, note = _tokenize_sources(spec, sources, tpl, counter)
        if data is None:
            return _at_cutoff(spec, notes + [note], t0)
        _cache_write(cache, key, data)
        return _profile(spec, data, tpl, notes, False, t0)
    raise AssertionError("unreachable: the characters counter always loads")


def _tokenize_sources(spec, sources, tpl, counter) -> tuple[dict | None, str]:
    data = {"method": counter.method, "shapes": [], "sources": [], "notes": []}
    for src in sources:
        try:
            rows = _read_source(src, spec.max_samples)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return None, one_line(f"planned at cutoff_len: cannot read {src.name!r} ({type(e).__name__}: {e})")
        shapes, dropped = _shapes(rows, src, spec, tpl, counter)
        data["shapes"] += shapes
        data["sources"].append([src.name, len(rows), dropped])
        data["notes"] += _source_notes(src)
    return data, ""


def _source_notes(src: _Source) -> list[str]:
    notes = []
    if src.num_samples is not None:
        notes.append(f"{src.name!r}: num_samples draws rows at random; all rows were measured")
    if any(src.columns.get(k) for k in ("images", "videos", "audios")):
        notes.append(f"{src.name!r}: media tokens (images/videos/audios) are not counted")
    if src.formatting == "openai":
        notes.append(f"{src.name!r}: openai formatting read as sharegpt")
    return notes


_HOW = {"tokenizer": "estimated: the model's tokenizer.json with LF's template rendered by dsplan",
        "chars": ("rough estimate: characters per token (Latin {latin}, digits {digit}, CJK {cjk}, other {other})"
                  .format(**CHARS_PER_TOKEN))}


def _profile(spec, data, tpl, notes, cached, t0) -> DataProfile:
    """Lengths at ``spec``'s cutoff from the cached shapes (cheap arithmetic, any cutoff)."""
    cutoff = spec.sample_cutoff
    stage = "sft" if spec.stage not in ("pt", "kto") and not spec.pairwise else spec.stage
    lengths, rejected = [], []
    truncated, longest = 0, 0
    for shape in data["shapes"]:
        n, r, raw = _length(shape, stage, cutoff, tpl.efficient_eos, spec.mask_history)
        lengths.append(n)
        rejected.append(r)
        truncated += raw > cutoff
        longest = max(longest, raw)
    sources = tuple((name, rows, tuple(drop)) for name, rows, drop in data["sources"])
    dropped = sum(len(d) for _, _, d in sources)
    how = _HOW[data["method"]]
    note = f"{how}; {dropped} malformed row(s) LF drops" if dropped else how
    return DataProfile(spec=spec, method=data["method"], method_note=note, lengths=tuple(lengths),
                       rejected=tuple(rejected) if spec.pairwise else None, truncated=truncated, dropped=dropped,
                       rows_read=sum(rows for _, rows, _ in sources), longest_untruncated=longest,
                       notes=tuple(notes + data["notes"]), cached=cached, seconds=time.monotonic() - t0,
                       sources=sources)


# ---------------------------------------------------------------- LF's own pipeline
def _lf_args(spec: DataSpec) -> dict:
    """The LF arguments the worker hands to get_train_args: the user's data options, no packing
    (per-sample lengths are wanted; the cutoff is lowered as packing would lower it)."""
    args = {"model_name_or_path": spec.model_name_or_path, "dataset": ",".join(spec.names),
            "dataset_dir": spec.dataset_dir, "cutoff_len": spec.sample_cutoff, "stage": spec.stage,
            "do_train": True, "finetuning_type": "lora", "packing": False, "neat_packing": False,
            "overwrite_cache": True, "report_to": "none", "enable_thinking": spec.enable_thinking,
            "preserve_thinking": spec.preserve_thinking, "mask_history": spec.mask_history}
    for key in ("template", "max_samples", "tool_format", "default_system"):
        if getattr(spec, key) is not None:
            args[key] = getattr(spec, key)
    return args


def _lf_key(spec: DataSpec, sources: list[_Source], python: str) -> dict:
    model = spec.model_name_or_path
    model_files = _stat_files(Path(model), ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                            "vocab.json", "merges.txt")) if model and Path(model).is_dir() else model
    return {"v": CACHE_VERSION, "what": "lf", "python": os.path.abspath(python), "files": _files_key(sources),
            "model": model_files, "args": _lf_args(spec)}


def _measure_lf(spec, sources, python, fresh, hits, notes, t0) -> DataProfile | None:
    """LF's lengths (from the cache, or from this call's worker run), or None with a note."""
    digest = _digest(_lf_key(spec, sources, python))
    cached = digest in hits
    data, note = (hits[digest], "") if cached else fresh.get(digest, (None, ""))
    if data is None:
        notes.append(note or "LLaMA-Factory's data pipeline did not answer: lengths estimated instead")
        return None
    lengths, rejected, local = data["lengths"], data.get("rejected"), data["local"]
    sources_map = (tuple((n, r, tuple(d)) for n, r, d in local)
                   if local and sum(r - len(d) for _, r, d in local) == len(lengths) else None)
    rows_read = sum(r for _, r, _ in local) if local else None
    rows = [max(c, r) for c, r in zip(lengths, rejected)] if rejected is not None else lengths
    return DataProfile(spec=spec, method="lf", method_note=f"exact: LLaMA-Factory's own data pipeline ({python})",
                       lengths=tuple(lengths), rejected=tuple(rejected) if rejected is not None else None,
                       truncated=sum(n >= spec.sample_cutoff for n in rows),
                       dropped=rows_read - len(lengths) if rows_read is not None else None, rows_read=rows_read,
                       notes=tuple(notes + data.get("notes", [])), cached=cached,
                       seconds=time.monotonic() - t0, sources=sources_map)


def _local_rows(spec: DataSpec, sources: list[_Source]):
    """(name, rows, dropped rows) per dataset, read here; None when this Python cannot read them."""
    out = []
    for src in sources:
        try:
            rows = _read_source(src, spec.max_samples)
        except (OSError, ValueError, UnicodeDecodeError, ImportError):
            return None
        out.append([src.name, len(rows), [i for i, row in enumerate(rows)
                                           if not _valid(_convert(row, src), spec.stage)]])
    return out


def _run_lf(python: str, todo: list[tuple[DataSpec, list[_Source]]], hits: dict, cache: Path | None,
            timeout: float) -> dict[str, tuple[dict | None, str]]:
    """Run LF's pipeline once for every spec not in ``hits``; {key digest: (data, note)}.
    Answers are written to the cache."""
    jobs, keys = [], []
    for spec, sources in todo:
        key = _lf_key(spec, sources, python)
        if _digest(key) not in hits and _digest(key) not in {_digest(k) for k, _, _ in keys}:
            keys.append((key, spec, sources))
            jobs.append({"args": _lf_args(spec), "pairwise": spec.pairwise})
    if not jobs:
        return {}
    private = all(s.load_from == "file" for _, _, sources in keys for s in sources)
    answers, note = _run_worker(python, {"private_cache": private, "jobs": jobs}, timeout)
    out: dict[str, tuple[dict | None, str]] = {}
    for i, (key, spec, sources) in enumerate(keys):
        result = answers.get(i)
        if result is None:
            out[_digest(key)] = (None, note)
        elif not result.get("ok"):
            out[_digest(key)] = (None, one_line(f"LLaMA-Factory's data pipeline failed ({result.get('error')}): "
                                                "lengths estimated instead"))
        else:
            data = {"lengths": result["lengths"], "rejected": result.get("rejected"),
                    "notes": result.get("notes", []), "local": _local_rows(spec, sources)}
            _cache_write(cache, key, data)
            out[_digest(key)] = (data, "")
    return out


def _run_worker(python: str, request: dict, timeout: float) -> tuple[dict[int, dict], str]:
    """The worker's answers by job index, and a note for the jobs it did not answer."""
    worker = Path(__file__).with_name("dataset_worker.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    try:
        proc = subprocess.run([python, str(worker)], input=json.dumps(request), capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}, f"LLaMA-Factory's data pipeline took over {timeout:.0f} s: lengths estimated instead"
    except OSError as e:
        return {}, f"cannot start {python} ({e.strerror or e}): lengths estimated instead"
    answers = {}
    for line in proc.stdout.splitlines():
        if line.startswith(_WORKER_TAG):
            try:
                result = json.loads(line[len(_WORKER_TAG):])
                answers[int(result["index"])] = result
            except (ValueError, KeyError, TypeError):
                continue
    tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
    return answers, one_line(f"LLaMA-Factory's data pipeline died (exit {proc.returncode}: {shorten(tail, 300)}): "
                             "lengths estimated instead")


# ---------------------------------------------------------------- the cache
def _stat_files(folder: Path, names) -> list:
    out = []
    for name in names:
        try:
            st = os.stat(folder / name)
        except OSError:
            continue
        out.append([str((folder / name).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _files_key(sources: list[_Source]) -> list:
    out = []
    for src in sources:
        entry = {k: v for k, v in src.__dict__.items() if k != "files"}
        stats = [_stat_files(p.parent, [p.name]) for p in src.files]
        out.append([entry, stats])
    return json.loads(json.dumps(out, default=str))


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cache_path(cache: Path, key: dict) -> Path:
    return cache / f"{_digest(key)}.json"


def _cache_read(cache: Path | None, key: dict) -> dict | None:
    if cache is None:
        return None
    try:
        data = json.loads(_cache_path(cache, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = isinstance(data, dict) and data.get("key") == json.loads(json.dumps(key, default=str))
    return data.get("data") if same else None


def _cache_write(cache: Path | None, key: dict, data: dict) -> None:
    """Best effort: a cache that cannot be written only costs the next call its time."""
    if cache is None:
        return
    try:
        text = json.dumps({"key": key, "data": data}, separators=(",", ":"), default=str)
        atomic_write(_cache_path(cache, key), text)
    except (OSError, TypeError, ValueError):
        pass


# ---------------------------------------------------------------- summaries
def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _stats(rows: list[int], truncated: int, dropped: int | None) -> LengthStats:
    s = sorted(rows)
    n = len(s)

    def rank(q: float) -> int:  # nearest-rank percentile
        return s[max(0, math.ceil(q * n) - 1)]

    return LengthStats(count=n, max=s[-1], p99=rank(0.99), median=rank(0.5), mean=round(sum(s) / n, 1),
                       min=s[0], truncated=truncated, dropped=dropped)


def _worst_batch(p: DataProfile, micro_batch: int) -> WorstBatch:
    spec = p.spec
    rows = micro_batch * (2 if spec.pairwise else 1)
    cutoff_tokens = rows * spec.cutoff_len
    if spec.packs:
        # packed rows are cutoff_len long; SFT's collator still rounds to a multiple of 8
        seq, basis = spec.cutoff_len if spec.stage == "pt" else _ceil_to(spec.cutoff_len, PAD_MULTIPLE), "packing"
    elif p.at_cutoff:
        seq, basis = spec.cutoff_len, "cutoff"
    else:
        longest = max(p.row_lengths())
        # pt's collator pads to the longest row; the others to a multiple of 8
        seq, basis = longest if spec.stage == "pt" else _ceil_to(longest, PAD_MULTIPLE), "data"
    return WorstBatch(rows=rows, seq_len=seq, tokens=rows * seq, cutoff_tokens=cutoff_tokens, basis=basis)


def _histogram(rows: list[int], cutoff: int, bins: int, width: int) -> list[str]:
    """Plain-text bars over (0, cutoff], equal steps (the last bin holds what truncation cut)."""
    if not rows or bins < 1:
        return []
    top = max(cutoff, max(rows))
    step = max(1, math.ceil(top / bins))
    counts = [0] * bins
    for n in rows:
        counts[min(max(n - 1, 0) // step, bins - 1)] += 1
    peak = max(counts)
    label = len(str(top))
    lines = []
    for i, c in enumerate(counts):
        lo, hi = i * step + 1, top if i == bins - 1 else (i + 1) * step
        bar = "#" * (math.ceil(width * c / peak) if c else 0)
        lines.append(f"{lo:>{label}}-{hi:<{label}} |{bar:<{width}}| {c}")
    return lines


def _longest(p: DataProfile, n: int) -> list[SampleRef]:
    if not p.sources or n < 1:
        return []
    refs: list[tuple[str, int]] = []
    for name, rows, dropped in p.sources:
        skip = set(dropped)
        refs += [(name, r) for r in range(rows) if r not in skip]
    lengths = p.row_lengths()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:n]
    return [SampleRef(*refs[i]) for i in order]


def read_samples(spec: DataSpec, refs: list[SampleRef]) -> list[dict]:
    """The raw rows ``refs`` name, as the dataset files hold them (for a preflight dataset
    written with the same dataset_info.json entry); raises UserError when they cannot be read."""
    sources, notes = _resolve(spec)
    if sources is None:
        raise UserError(notes[0])
    rows = {src.name: _read_source(src, spec.max_samples) for src in sources if any(r.dataset == src.name
                                                                                    for r in refs)}
    return [rows[r.dataset][r.row] for r in refs]


def _profile_json(p: DataProfile, micro_batch: int | None) -> dict:
    stats = p.stats()
    out = {"method": p.method, "exact": p.exact, "method_note": p.method_note, "datasets": p.spec.names,
           "stage": p.spec.stage, "cutoff_len": p.spec.cutoff_len, "packing": p.spec.packs,
           "stats": stats.__dict__ if stats else None, "longest_untruncated": p.longest_untruncated,
           "histogram": p.histogram(), "notes": list(p.notes), "cached": p.cached, "seconds": round(p.seconds, 3)}
    if micro_batch is not None:
        out["worst_batch"] = p.worst_batch(micro_batch).__dict__
    return out
