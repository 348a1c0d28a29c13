"""Calibration samples: one estimate beside one measured GPU peak, read from run folders and sample files.

``dsplan calibrate --from`` takes two kinds of source:

- **A run folder** of ``dsplan run`` (or its ``attempts.jsonl``).  Each end record of
  the ledger carries ``hardware``, ``estimate``, ``measured`` and ``oom_figures``
  (:mod:`dsplan.launch.measure`); a record is a sample when it has them.
- **A sample file** (``*.jsonl``) as ``scripts/gpu_check.py`` writes it, one JSON
  object per line, in the format ``dsplan-sample/1``::

    {"format": "dsplan-sample/1", "source": "gpu_check",
     "hardware": {"backend": "cuda", "gpu_name": "H200", "gpu_mem_bytes": 150323855360,
                  "world_size": 1, "nodes": 1, "gpus_per_node": 1},
     "tier": "zero2", "micro_batch": 1, "cutoff_len": 1024, "verdict": "success",
     "estimate": {"gpu_bytes": ..., "host_bytes": ..., "breakdown": {"overhead": ..., ...},
                  "host_breakdown": {...}, "transient_bytes": ..., "context_bytes": ..., "nccl_bytes": ...,
                  "headroom_shift": 0.0, "runtime_source": "default", "seq_len": 1024, "tokens": 1024,
                  "planned_at": "cutoff_len"},
     "measured": {"vram_allocated_bytes": ..., "vram_reserved_bytes": ..., "host_peak_bytes": ...},
     "oom_figures": {"tried": ..., "allocated": ..., "reserved": ..., "total": ..., "free": ...},
     "case": {...}}

  ``hardware``, ``tier``, ``verdict`` and ``estimate`` are required.  ``verdict`` is a
  ledger verdict (``success``, ``gpu_oom``, ``host_oom``, ``not_oom``, ...).  Sizes are
  bytes; a figure nobody measured is ``null``.  ``estimate``'s keys after
  ``transient_bytes`` say what it assumed (:func:`dsplan.launch.measure.plan_assumptions`)
  and may be missing in older files.  ``oom_figures`` is ``null`` unless the attempt ran out of GPU
  memory; ``case`` is free-form (what was run) and is not read.  A run folder's end
  records have the same keys, so both sources read alike.

What counts: a ``success`` with a measured reserved peak (``vram_reserved_bytes``) is a
*measured* sample; a ``gpu_oom`` whose message stated what was reserved (or allocated),
or that logged a peak before it failed, is a *lower bound*: the step needed at least
reserved + tried (:func:`dsplan.learn.compare.oom_bound`, the rule ``dsplan report``
uses too).  Anything else is skipped with one reason: a CPU run (no GPU figure), a host
OOM, a failure for another reason, a ledger written before ``dsplan run`` recorded the
hardware or ``transient_bytes``.  Each ledger is read once, however it is named (its
folder, or the file, through any link).  Files are read within fixed bounds, and a
damaged line is a skip, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dsplan.codes import Component, Verdict
from dsplan.errors import UserError, excerpt
from dsplan.inputs.hardware import BACKENDS, find_gpu_model
from dsplan.inputs.reading import path_kind, read_text
from dsplan.learn.compare import nbytes, oom_bound

FORMAT = "dsplan-sample/1"
#: The largest ledger or sample file read (a ledger line is a few KB; a run has a handful).
MAX_SOURCE_BYTES = 64 * 1024 * 1024
#: Longest JSON line read from a sample file.
MAX_LINE_CHARS = 1024 * 1024
UNKNOWN_CARD = "unknown"


def card_name(gpu_name: str | None) -> str:
    """The card a sample belongs to: dsplan's name for a known GPU model ("NVIDIA A100-SXM4-80GB"
    -> "A100"), else the name without spaces, dashes and underscores, lower case; "unknown" for none."""
    if not gpu_name or not isinstance(gpu_name, str):
        return UNKNOWN_CARD
    model = find_gpu_model(gpu_name)
    if model is not None:
        return model.name
    norm = re.sub(r"[\s_-]+", "", gpu_name).lower()[:64]
    return norm if norm.isprintable() and norm else UNKNOWN_CARD


@dataclass(frozen=True)
class Sample:
    """One attempt's estimate beside what its GPU showed.  ``measured_bytes``: the reserved peak
    of a finished run; ``lower_bound``: reserved (or allocated) + tried of a GPU OOM."""

    where: str
    backend: str
    card: str
    world_size: int
    stage: int
    gpu_bytes: int
    overhead_bytes: int
    transient_bytes: int
    measured_bytes: int | None = None
    lower_bound: int | None = None
    planned_at: str | None = None  # "cutoff_len" or "dataset": how the estimate sized its rows (None: not recorded)

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.card}"

    @property
    def base_bytes(self) -> int:
        """The estimate without its runtime overhead: what a calibration does not change."""
        return self.gpu_bytes - self.overhead_bytes

    @property
    def is_bound(self) -> bool:
        return self.measured_bytes is None


@dataclass(frozen=True)
class Skip:
    """A record that is not a sample, and why (``key``: its backend/card when known)."""

    where: str
    reason: str
    key: str | None = None


@dataclass
class Samples:
    """What the sources held: the samples, the records skipped, and the sources read."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def skip_reasons(self, key: str | None = None) -> Counter:
        """How many records were skipped for each reason (those of one backend/card, if given)."""
        return Counter(s.reason for s in self.skipped if key is None or s.key == key)


def _hardware(rec: dict) -> tuple[str, str, int] | str:
    """(backend, card, world size), or why the record has none."""
    hw = rec.get("hardware")
    if not isinstance(hw, dict):
        return "no hardware recorded (a ledger from a dsplan before calibration)"
    backend = hw.get("backend")
    if backend not in BACKENDS:
        return f"unknown backend {excerpt(backend, 30)}"
    world = hw.get("world_size", 1)
    if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= 1 << 20:
        return f"bad world_size {excerpt(world, 30)}"
    return backend, card_name(hw.get("gpu_name")), world


def _estimate(rec: dict) -> tuple[int, int, int] | str:
    """(gpu_bytes, its overhead component, transient_bytes), or why they are missing."""
    est = rec.get("estimate")
    if not isinstance(est, dict):
        return "no estimate recorded"
    gpu = nbytes(est.get("gpu_bytes"))
    breakdown = est.get("breakdown") if isinstance(est.get("breakdown"), dict) else {}
    overhead = nbytes(breakdown.get(str(Component.OVERHEAD)))
    transient = nbytes(est.get("transient_bytes"))
    if gpu is None or overhead is None or overhead > gpu:
        return "estimate without gpu_bytes and its overhead"
    if transient is None:
        return "estimate without transient_bytes (a ledger from a dsplan before calibration)"
    return gpu, overhead, transient


def _stage(tier) -> int | None:
    from dsplan.plan.tiers import get_tier

    try:
        return get_tier(tier).stage if isinstance(tier, str) else None
    except UserError:
        return None


def _peak(rec: dict) -> tuple[int | None, int | None] | str:
    """(measured reserved peak, OOM lower bound): one of them set, or why neither is."""
    verdict = rec.get("verdict")
    if verdict == Verdict.SUCCESS:
        measured = rec.get("measured") if isinstance(rec.get("measured"), dict) else {}
        reserved = nbytes(measured.get("vram_reserved_bytes"))
        if not reserved:
            return "no GPU peak measured (a CPU run, or RECORD_VRAM=0)"
        return reserved, None
    if verdict == Verdict.GPU_OOM:
        bound = oom_bound(rec.get("oom_figures"), rec.get("measured"))
        if bound is None:
            return "GPU OOM whose message states no reserved or allocated figure, and no logged peak"
        return None, bound[0]
    return f"verdict {excerpt(verdict, 30)}: neither a finished run nor a GPU OOM"


def to_sample(rec: dict, where: str) -> Sample | Skip:
    """A ledger end record or a ``dsplan-sample/1`` object as a sample, or why it is none."""
    hw = _hardware(rec)
    if isinstance(hw, str):
        return Skip(where, hw)
    backend, card, world = hw
    key = f"{backend}/{card}"
    stage = _stage(rec.get("tier"))
    est = _estimate(rec)
    peak = _peak(rec)
    for problem in (None if stage else f"unknown tier {excerpt(rec.get('tier'), 30)}", est, peak):
        if isinstance(problem, str):
            return Skip(where, problem, key)
    (gpu, overhead, transient), (measured, bound) = est, peak
    planned = rec["estimate"].get("planned_at")
    return Sample(where, backend, card, world, stage, gpu, overhead, transient, measured, bound,
                  planned if planned in ("cutoff_len", "dataset") else None)


def _bounded_int(text: str) -> int:
    if len(text) > 100:
        raise ValueError("an integer of over 100 digits")
    return int(text)


def _json_lines(text: str, name: str):
    """(where, object or None) for each non-blank line; None for a line that is no JSON object."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        obj = None
        if len(line) <= MAX_LINE_CHARS:
            try:
                obj = json.loads(line, parse_int=_bounded_int)
            except (ValueError, RecursionError):
                obj = None
        yield f"{name} line {lineno}", obj if isinstance(obj, dict) else None


def read_sample_file(path: Path, out: Samples) -> None:
    """The samples of a ``dsplan-sample/1`` JSON-lines file (``scripts/gpu_check.py``)."""
    text = read_text(path, f"sample file {path}", MAX_SOURCE_BYTES)
    for where, obj in _json_lines(text, str(path)):
        if obj is None:
            out.skipped.append(Skip(where, "not a JSON object"))
        elif obj.get("format") != FORMAT:
            out.skipped.append(Skip(where, f"not a {FORMAT} record (format {excerpt(obj.get('format'), 30)})"))
        else:
            _add(out, to_sample(obj, where))


def read_run_dir(run_dir: Path, out: Samples) -> None:
    """The samples of a run folder's ledger (its end records; unfinished attempts are skipped)."""
    from dsplan.launch.ledger import ATTEMPTS_FILE, load_ledger

    ledger = run_dir / ATTEMPTS_FILE
    kind = path_kind(ledger)
    if kind is None:
        out.skipped.append(Skip(str(run_dir), f"no {ATTEMPTS_FILE}: not a dsplan run folder"))
        return
    if kind != "file" or os.stat(ledger).st_size > MAX_SOURCE_BYTES:
        raise UserError(f"{ledger} is not a regular file of at most {MAX_SOURCE_BYTES} bytes")
    try:
        records = load_ledger(run_dir).records
    except OSError as e:
        raise UserError(f"cannot read {ledger}: {e.strerror or e}") from None
    for rec in records:
        where = f"{ledger} attempt {rec.attempt}"
        if rec.is_unfinished:
            out.skipped.append(Skip(where, "no end record (its dsplan stopped during it)"))
        else:
            _add(out, to_sample(rec.to_dict(), where))


def _add(out: Samples, got: Sample | Skip) -> None:
    (out.samples if isinstance(got, Sample) else out.skipped).append(got)


def _ledger_of(path: Path, kind: str) -> Path | None:
    """The ledger a source names: a run folder's ``attempts.jsonl``, or the file itself when it
    is one (None for a sample file)."""
    from dsplan.launch.ledger import ATTEMPTS_FILE

    if kind == "dir":
        return path / ATTEMPTS_FILE
    return path if path.name == ATTEMPTS_FILE else None


def read_samples(sources) -> Samples:
    """Every sample of the given run folders, ledgers and sample files, each file read once (by
    the real path of the file read: a folder and its ``attempts.jsonl`` are one source).  A
    source that does not exist is a :class:`UserError`."""
    out = Samples()
    seen = set()
    for source in sources:
        path = Path(source).absolute()  # the file lists its sources, readable from anywhere
        kind = path_kind(path)
        if kind is None:
            raise UserError(f"--from {excerpt(str(source))}: no such file or folder")
        ledger = _ledger_of(path, kind)
        real = os.path.realpath(ledger if ledger is not None else path)
        if real in seen:
            continue
        seen.add(real)
        out.sources.append(str(path))
        if ledger is not None:
            read_run_dir(ledger.parent, out)
        else:
            read_sample_file(path, out)
    return out
