"""The attempts ledger (``attempts.jsonl``): the record of every attempt, and the run's state.

A rerun of ``dsplan run`` on the same folder reads :class:`RunState` from it to
know where to continue and which configurations already ran out of memory.

A run folder holds one ``attempt-NNN/`` folder per launch and one line per
finished attempt in ``attempts.jsonl``.  Lines are appended with ``O_APPEND``
and a single ``write`` of the whole line, then fsync'd, so a reader (``dsplan
status`` in another terminal, say) sees whole records; if the machine dies
mid-write, only the last line can be cut short, and :func:`read_attempts`
drops it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dsplan.codes import OOM_VERDICTS, Verdict
from dsplan.fsutil import json_objects

ATTEMPTS_FILE = "attempts.jsonl"
ATTEMPT_DIR_PREFIX = "attempt-"
_ATTEMPT_DIR_RE = re.compile(r"^attempt-(\d+)$")

#: The verdicts an attempt can end with (the names match ``dsplan.logs.classifier``).
#: ``unknown`` is accepted too: the classifier's ``conclude`` may return it.
VERDICTS = ("gpu_oom", "host_oom", "not_oom", "success", "stalled", "interrupted", "unknown")

#: Required fields, in the order they are written.
FIELDS = ("attempt", "tier", "micro_batch", "grad_accum", "cutoff_len", "started", "ended", "exit_code",
          "verdict", "evidence", "output_dir")


class LedgerError(ValueError):
    """A record that does not have the shape the ledger promises its readers."""


def _positive_int(rec: dict, key: str) -> None:
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise LedgerError(f"attempt record: {key} must be a positive integer, got {v!r}")


def _iso(rec: dict, key: str) -> None:
    v = rec[key]
    if not isinstance(v, str):
        raise LedgerError(f"attempt record: {key} must be an ISO-8601 string, got {v!r}")
    try:
        datetime.fromisoformat(v)
    except ValueError:
        raise LedgerError(f"attempt record: {key} is not ISO-8601: {v!r}") from None


def validate_record(record: dict[str, Any]) -> dict[str, Any]:
    """Check a record and return a normalised copy (required fields first, paths as
    strings).  Extra keys are kept.  Raises :class:`LedgerError`."""
    if not isinstance(record, dict):
        raise LedgerError(f"attempt record must be a dict, got {type(record).__name__}")
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise LedgerError(f"attempt record is missing {', '.join(missing)}")
    rec = {k: record[k] for k in FIELDS}
    rec.update({k: v for k, v in record.items() if k not in rec})
    for key in ("attempt", "micro_batch", "grad_accum", "cutoff_len"):
        _positive_int(rec, key)
    if not isinstance(rec["tier"], str) or not rec["tier"]:
        raise LedgerError(f"attempt record: tier must be a non-empty string, got {rec['tier']!r}")
    _iso(rec, "started")
    _iso(rec, "ended")
    ec = rec["exit_code"]
    if ec is not None and (isinstance(ec, bool) or not isinstance(ec, int)):
        raise LedgerError(f"attempt record: exit_code must be an integer or null, got {ec!r}")
    if rec["verdict"] not in VERDICTS:
        raise LedgerError(f"attempt record: verdict must be one of {', '.join(VERDICTS)}, got {rec['verdict']!r}")
    if rec["evidence"] is None:
        rec["evidence"] = ""
    if not isinstance(rec["evidence"], str):
        raise LedgerError(f"attempt record: evidence must be a string, got {rec['evidence']!r}")
    if isinstance(rec["output_dir"], os.PathLike):
        rec["output_dir"] = os.fspath(rec["output_dir"])
    if not isinstance(rec["output_dir"], str) or not rec["output_dir"]:
        raise LedgerError(f"attempt record: output_dir must be a path, got {rec['output_dir']!r}")
    return rec


def append_attempt(run_dir: Path | str, record: dict[str, Any]) -> dict[str, Any]:
    """Validate ``record`` and append it to ``<run_dir>/attempts.jsonl`` as one line:
    one ``os.write`` on an ``O_APPEND`` descriptor, then ``fsync``.  Returns the
    normalised record that was written."""
    rec = validate_record(record)
    try:
        line = json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise LedgerError(f"attempt record is not JSON-serialisable: {e}") from None
    data = line.encode("utf-8")
    path = Path(run_dir) / ATTEMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A line cut short by an earlier crash would swallow this record: end it first.
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or similar; finish the line anyway
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return rec


def read_attempts(run_dir: Path | str) -> list[dict[str, Any]]:
    """All records in ``<run_dir>/attempts.jsonl``, oldest first.  A missing file is
    an empty ledger; a line that does not parse (a write cut short by a crash) is
    skipped."""
    path = Path(run_dir) / ATTEMPTS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return list(json_objects(data.split(b"\n")))


def attempt_dir_number(path: Path | str) -> int | None:
    """The N of an ``attempt-N`` folder name, or None."""
    m = _ATTEMPT_DIR_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def next_attempt_dir(run_dir: Path | str) -> Path:
    """Create and return the next free ``attempt-NNN`` folder (001, 002, ...).

    The folder is made with ``os.mkdir``, which fails if the name exists, so an
    existing folder is never reused and two processes racing for the same
    number each end up with their own folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    numbers = [n for n in (attempt_dir_number(p) for p in os.listdir(run_dir)) if n is not None]
    n = max(numbers, default=0) + 1
    while True:
        candidate = run_dir / f"{ATTEMPT_DIR_PREFIX}{n:03d}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            n += 1
            continue
        return candidate


@dataclass(frozen=True)
class AttemptRecord:
    """One finished attempt, as one line of ``attempts.jsonl``."""

    attempt: int
    tier: str
    micro_batch: int
    grad_accum: int
    cutoff_len: int
    started: str  # ISO 8601 with offset
    ended: str
    exit_code: int | None  # negative: killed by that signal; None: unknown
    verdict: str  # a dsplan.codes.Verdict value
    evidence: str  # the deciding log line, or ""
    output_dir: str
    extra: dict = field(default_factory=dict)  # further keys, kept as written

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttemptRecord:
        rec = validate_record(d)
        return cls(**{k: rec[k] for k in FIELDS}, extra={k: v for k, v in rec.items() if k not in FIELDS})

    @property
    def config(self) -> tuple[str, int, int]:
        """What an attempt tried, for "never run the same thing out of memory twice": tier, micro-batch, cutoff."""
        return self.tier, self.micro_batch, self.cutoff_len


@dataclass
class RunState:
    """What a run folder's ledger says: the attempts so far, in order."""

    records: list[AttemptRecord]

    @classmethod
    def load(cls, run_dir: Path | str) -> RunState:
        """The ledger's valid records; lines another tool wrote in another shape are skipped."""
        records = []
        for raw in read_attempts(run_dir):
            try:
                records.append(AttemptRecord.from_dict(raw))
            except LedgerError:
                continue
        return cls(records)

    @property
    def last(self) -> AttemptRecord | None:
        return self.records[-1] if self.records else None

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.verdict == Verdict.SUCCESS

    def oom_attempt(self, tier: str, micro_batch: int, cutoff_len: int) -> AttemptRecord | None:
        """The earlier attempt that ran out of memory with this configuration, if any."""
        for rec in self.records:
            if rec.config == (tier, micro_batch, cutoff_len) and rec.verdict in OOM_VERDICTS:
                return rec
        return None
