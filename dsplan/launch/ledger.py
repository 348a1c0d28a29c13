"""The attempts ledger (``attempts.jsonl``): the record of every attempt, and the run's state.

A rerun of ``dsplan run`` on the same folder reads :class:`RunState` from it to
know where to continue and which configurations already ran out of memory.

A run folder holds one ``attempt-NNN/`` folder per launch and, per attempt, two
lines in ``attempts.jsonl``: a *started* line (``"event": "started"`` with the
attempt's number, configuration, start time and output folder) written before
the training command starts, and, when it ends, the full record (:data:`FIELDS`),
the same line earlier versions wrote, so their ledgers read as before.  An
attempt with a started line and no full record is one whose dsplan died during
it (``kill -9``, a lost node): readers show it as ``interrupted`` with
``unfinished`` set.

Lines are appended with ``O_APPEND`` and a single ``write`` of the whole line,
then fsync'd, so a reader (``dsplan status`` in another terminal, say) sees whole
records; if the machine dies mid-write, only the last line can be cut short.

Space for the end line is reserved before the attempt starts (:func:`start_attempt`):
a file of 64 KiB of random bytes, ``.attempt-reserve``, deleted just before the end
line is appended, so a training whose output fills the disk is still recorded.
A separate file rather than a padded line rewritten in place: the ledger stays
append-only (a crash can cut the last line short but never garble a finished
record) and free of padding, and deleting a file frees space on every
filesystem, copy-on-write ones included, where rewriting in place needs new
blocks.  Random bytes, because a compressing filesystem stores zeros in nothing.

Both lines may carry further keys, kept as written (``AttemptRecord.extra``).
``dsplan run`` adds ``hardware`` (backend, GPU name and memory, GPUs per node, nodes and
world size of the plan), ``resumed_from`` (the checkpoint an attempt started from, how, and
for a resume across tiers what was lost), on the end line ``estimate``, ``measured`` and
``oom_figures`` (:mod:`dsplan.launch.measure`), and inside a Slurm allocation ``nodes`` (the
node list), ``slurm_job``, and on the end line ``evidence_node`` / ``evidence_rank``
(where the deciding line came from), ``slurm_step`` and ``step_end_seconds`` (how long
ending the step on every node took).  A ``dsplan run --preflight`` attempt has
``"preflight": true`` on both lines: its OOM counts for "never repeat", its pass lets a
rerun skip that configuration's preflight, and it never ends the run nor leaves a
checkpoint to resume from.

Reading tolerates damage: a line that is not JSON, one nested deeper than
:data:`MAX_LINE_DEPTH`, or a record that lacks fields or names no tier of
``dsplan.plan.tiers`` is skipped, and :attr:`Ledger.problems` says so in one line
naming its line number.
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
from dsplan.errors import excerpt
from dsplan.plan.tiers import TIER_NAMES

ATTEMPTS_FILE = "attempts.jsonl"
RESERVE_FILE = ".attempt-reserve"
#: Bytes kept free for the end line of the running attempt.
RESERVE_BYTES = 64 * 1024
#: Longest evidence (characters) an end line carries, so it always fits the reserve.
MAX_EVIDENCE = 4000
ATTEMPT_DIR_PREFIX = "attempt-"
_ATTEMPT_DIR_RE = re.compile(r"^attempt-(\d+)$")

#: The verdicts an attempt can end with (the names match ``dsplan.logs.classifier``).
#: ``unknown`` is accepted too: the classifier's ``conclude`` may return it.
VERDICTS = ("gpu_oom", "host_oom", "not_oom", "success", "stalled", "interrupted", "unknown")

#: Required fields, in the order they are written.
FIELDS = ("attempt", "tier", "micro_batch", "grad_accum", "cutoff_len", "started", "ended", "exit_code",
          "verdict", "evidence", "output_dir")
#: Fields of a started line (with ``"event": "started"``).
START_FIELDS = ("attempt", "tier", "micro_batch", "grad_accum", "cutoff_len", "started", "output_dir")
#: Deepest nesting of lists and objects a ledger line may have (dsplan writes 4 or so); a deeper
#: one is damaged, and would not survive being parsed or printed again.
MAX_LINE_DEPTH = 32
#: The evidence of an attempt that has a started line and no end line.
UNFINISHED_EVIDENCE = "no end record: dsplan stopped during this attempt (killed, or the machine went down)"


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


def _check_common(rec: dict) -> None:
    """The checks a started line and a full record share."""
    for key in ("attempt", "micro_batch", "grad_accum", "cutoff_len"):
        _positive_int(rec, key)
    if not isinstance(rec["tier"], str) or not rec["tier"]:
        raise LedgerError(f"attempt record: tier must be a non-empty string, got {rec['tier']!r}")
    if rec["tier"] not in TIER_NAMES:
        raise LedgerError(f"attempt record: tier must be one of {', '.join(TIER_NAMES)}, got {excerpt(rec['tier'])}")
    _iso(rec, "started")
    if isinstance(rec["output_dir"], os.PathLike):
        rec["output_dir"] = os.fspath(rec["output_dir"])
    if not isinstance(rec["output_dir"], str) or not rec["output_dir"]:
        raise LedgerError(f"attempt record: output_dir must be a path, got {rec['output_dir']!r}")


def _ordered(record: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """A copy with ``fields`` first; raises :class:`LedgerError` when any is missing."""
    if not isinstance(record, dict):
        raise LedgerError(f"attempt record must be a dict, got {type(record).__name__}")
    missing = [k for k in fields if k not in record]
    if missing:
        raise LedgerError(f"attempt record is missing {', '.join(missing)}")
    rec = {k: record[k] for k in fields}
    rec.update({k: v for k, v in record.items() if k not in rec})
    return rec


def validate_record(record: dict[str, Any]) -> dict[str, Any]:
    """Check a full (end) record and return a normalised copy (required fields first,
    paths as strings).  Extra keys are kept.  Raises :class:`LedgerError`."""
    rec = _ordered(record, FIELDS)
    _check_common(rec)
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
    return rec


def validate_started(record: dict[str, Any]) -> dict[str, Any]:
    """Check a started line and return a normalised copy with ``"event": "started"``."""
    rec = _ordered(record, START_FIELDS)
    _check_common(rec)
    rec["event"] = "started"
    return rec


def _encode(rec: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise LedgerError(f"attempt record is not JSON-serialisable: {e}") from None


def _append(run_dir: Path | str, data: bytes) -> None:
    """Append one line: one ``os.write`` on an ``O_APPEND`` descriptor, then ``fsync``.
    An ``OSError`` always names the ledger."""
    path = Path(run_dir) / ATTEMPTS_FILE
    try:
        _append_to(path, data)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def _append_to(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
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


def append_attempt(run_dir: Path | str, record: dict[str, Any]) -> dict[str, Any]:
    """Validate a full ``record`` and append it to ``<run_dir>/attempts.jsonl`` as one
    line.  Returns the normalised record that was written."""
    rec = validate_record(record)
    _append(run_dir, _encode(rec))
    return rec


# --------------------------------------------------------------------------- one attempt's two lines


def _reserve(path: Path) -> None:
    """Fill ``path`` with :data:`RESERVE_BYTES` random bytes (space the end line can have back)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            data = memoryview(os.urandom(RESERVE_BYTES))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink(path)
        raise


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class AttemptSlot:
    """A started attempt whose end line has space set aside: :meth:`complete` writes it."""

    def __init__(self, run_dir: Path, started: dict[str, Any]):
        self.run_dir = run_dir
        self.started = started
        self.done = False

    @property
    def attempt(self) -> int:
        return self.started["attempt"]

    def complete(self, record: dict[str, Any]) -> dict[str, Any]:
        """Give back the reserved space and append the full record (evidence cut to
        :data:`MAX_EVIDENCE` characters).  Raises ``OSError`` if even that fails; the
        started line then stands, read as an unfinished attempt."""
        record = dict(record)
        ev = record.get("evidence") or ""
        if isinstance(ev, str) and len(ev) > MAX_EVIDENCE:
            record["evidence"] = ev[:MAX_EVIDENCE - 1] + "\u2026"
        rec = validate_record(record)
        data = _encode(rec)
        self.release()
        _append(self.run_dir, data)
        self.done = True
        return rec

    def release(self) -> None:
        """Give back the reserved space without writing anything."""
        _unlink(self.run_dir / RESERVE_FILE)


def start_attempt(run_dir: Path | str, fields: dict[str, Any]) -> AttemptSlot:
    """Set aside space for the attempt's end line, then append its started line
    (:data:`START_FIELDS`; extra keys kept).  Raises ``OSError`` when either cannot be
    written -- then nothing of the attempt is in the ledger and no space stays taken."""
    run_dir = Path(run_dir)
    rec = validate_started(fields)
    data = _encode(rec)
    try:
        _reserve(run_dir / RESERVE_FILE)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} (setting aside {RESERVE_BYTES // 1024} KiB for the attempt's "
                      "record)", e.filename or str(run_dir / RESERVE_FILE)) from None
    try:
        _append(run_dir, data)
    except BaseException:
        _unlink(run_dir / RESERVE_FILE)
        raise
    return AttemptSlot(run_dir, rec)


# --------------------------------------------------------------------------- reading


def _too_deep(obj: Any, limit: int = MAX_LINE_DEPTH) -> bool:
    """Whether ``obj`` nests lists and dicts more than ``limit`` levels (walked without recursion)."""
    level = [obj]
    for _ in range(limit + 1):
        level = [v for o in level if isinstance(o, (list, dict)) for v in (o.values() if isinstance(o, dict) else o)]
        if not level:
            return False
    return True


def _parse_line(raw: bytes, lineno: int, last: bool) -> tuple[dict | None, str | None]:
    """(record dict, None) or (None, why it was skipped) for one non-blank line."""
    deep = f"{ATTEMPTS_FILE} line {lineno}: nested more than {MAX_LINE_DEPTH} levels deep; skipped"
    try:
        obj = json.loads(raw.decode("utf-8", errors="replace"))
    except RecursionError:
        return None, deep
    except ValueError:
        why = "cut short (dsplan stopped while writing it?)" if last else "not JSON"
        return None, f"{ATTEMPTS_FILE} line {lineno}: {why}; skipped"
    if _too_deep(obj):
        return None, deep
    try:
        if isinstance(obj, dict) and obj.get("event") == "started":
            return validate_started(obj), None
        return validate_record(obj), None
    except LedgerError as e:
        return None, f"{ATTEMPTS_FILE} line {lineno}: {e}; skipped"


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt as the ledger tells it: its end line, or, for an attempt whose
    dsplan died during it, its started line read as ``interrupted`` (``unfinished``)."""

    attempt: int
    tier: str
    micro_batch: int
    grad_accum: int
    cutoff_len: int
    started: str  # ISO 8601 with offset
    ended: str | None  # None: unfinished
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

    @classmethod
    def unfinished(cls, started: dict[str, Any]) -> AttemptRecord:
        """The attempt of a started line that never got its end line."""
        extra = {k: v for k, v in started.items() if k not in START_FIELDS and k != "event"}
        return cls(**{k: started[k] for k in START_FIELDS}, ended=None, exit_code=None,
                   verdict=Verdict.INTERRUPTED.value, evidence=UNFINISHED_EVIDENCE,
                   extra={**extra, "unfinished": True})

    @property
    def is_unfinished(self) -> bool:
        return bool(self.extra.get("unfinished"))

    @property
    def is_preflight(self) -> bool:
        """A ``dsplan run --preflight`` attempt on the longest samples, not the real run."""
        return self.extra.get("preflight") is True

    @property
    def config(self) -> tuple[str, int, int]:
        """What an attempt tried, for "never run the same thing out of memory twice": tier, micro-batch, cutoff."""
        return self.tier, self.micro_batch, self.cutoff_len


@dataclass
class Ledger:
    """What ``attempts.jsonl`` holds: one record per attempt, in the order they started,
    and one line per damaged line that was skipped."""

    records: list[AttemptRecord]
    problems: list[str]


def load_ledger(run_dir: Path | str) -> Ledger:
    """Read ``<run_dir>/attempts.jsonl``.  A missing file is an empty ledger; damaged
    lines are skipped and listed in ``problems``.  Raises ``OSError`` when the ledger
    cannot be read at all (it is a folder, say)."""
    path = Path(run_dir) / ATTEMPTS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Ledger([], [])
    lines = data.split(b"\n")
    by_number: dict[int, AttemptRecord] = {}
    problems = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        rec, problem = _parse_line(raw.strip(), i, last=i == len(lines))
        if problem is not None:
            problems.append(problem)
        elif rec.get("event") == "started":
            by_number.setdefault(rec["attempt"], AttemptRecord.unfinished(rec))
        else:
            by_number[rec["attempt"]] = AttemptRecord(**{k: rec[k] for k in FIELDS},
                                                      extra={k: v for k, v in rec.items() if k not in FIELDS})
    return Ledger(list(by_number.values()), problems)


def read_attempts(run_dir: Path | str) -> list[dict[str, Any]]:
    """Every attempt in ``<run_dir>/attempts.jsonl`` as a dict, in the order they started:
    its full record, or for an unfinished attempt its started fields with verdict
    ``interrupted``, ``ended`` null and ``unfinished`` true.  Damaged lines are skipped
    (:func:`load_ledger` says which)."""
    return [r.to_dict() for r in load_ledger(run_dir).records]


def attempt_dir_number(path: Path | str) -> int | None:
    """The N of an ``attempt-N`` folder name, or None."""
    m = _ATTEMPT_DIR_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def next_attempt_dir(run_dir: Path | str, after: int = 0) -> Path:
    """Create and return the next free ``attempt-NNN`` folder (001, 002, ...), numbered
    above every existing folder and above ``after`` (the ledger's highest attempt).

    The folder is made with ``os.mkdir``, which fails if the name exists, so an
    existing folder is never reused and two processes racing for the same
    number each end up with their own folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    numbers = [n for n in (attempt_dir_number(p) for p in os.listdir(run_dir)) if n is not None]
    n = max(numbers + [after], default=0) + 1
    while True:
        candidate = run_dir / f"{ATTEMPT_DIR_PREFIX}{n:03d}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            n += 1
            continue
        return candidate


@dataclass
class RunState:
    """What a run folder's ledger says: the attempts so far, in order, and the damaged
    lines that were skipped."""

    records: list[AttemptRecord]
    problems: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path | str) -> RunState:
        """Raises ``OSError`` when the ledger cannot be read at all."""
        ledger = load_ledger(run_dir)
        return cls(ledger.records, ledger.problems)

    @property
    def last(self) -> AttemptRecord | None:
        return self.records[-1] if self.records else None

    @property
    def highest(self) -> int:
        """The highest attempt number so far (0 for none)."""
        return max((r.attempt for r in self.records), default=0)

    @property
    def finished(self) -> bool:
        """The real run succeeded (a preflight that passed is not the end of the run)."""
        return self.last is not None and self.last.verdict == Verdict.SUCCESS and not self.last.is_preflight

    def preflight_passed(self, tier: str, micro_batch: int, cutoff_len: int) -> AttemptRecord | None:
        """The preflight attempt that passed with this configuration, if any (``dsplan run --preflight``)."""
        for rec in self.records:
            if rec.is_preflight and rec.config == (tier, micro_batch, cutoff_len) and rec.verdict == Verdict.SUCCESS:
                return rec
        return None

    def oom_attempt(self, tier: str, micro_batch: int, cutoff_len: int) -> AttemptRecord | None:
        """The earlier attempt that ran out of memory with this configuration, if any."""
        for rec in self.records:
            if rec.config == (tier, micro_batch, cutoff_len) and rec.verdict in OOM_VERDICTS:
                return rec
        return None
