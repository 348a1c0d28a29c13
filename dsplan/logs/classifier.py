"""Read a training log line by line and decide why the run ended.

This is the one place that turns lines into a verdict.  The launcher feeds
every line of every rank to a :class:`Classifier` as it arrives; a line that
proves a GPU or host OOM comes back from :meth:`Classifier.feed` as a
:class:`Finding`, and the launcher kills all ranks at once and falls back a
tier.  After the process has ended, :meth:`Classifier.conclude` gives the final
verdict.  ``dsplan diagnose`` runs the same classifier over a saved log.

When an OOM line kills the run, and when it does not
-----------------------------------------------------
Programs catch OOMs and go on: fairseq skips the batch, a trainer with an
automatic batch size retries smaller, a wrapper logs ``WARNING caught
torch.OutOfMemoryError: CUDA out of memory ...; retrying``.  Killing such a run
throws away a healthy attempt, so an OOM line is sorted three ways the moment
it is seen:

* **confirmed**: the line reports a death by itself (the kernel's or Ray's OOM
  killer, a SIGKILL exit code or signal, ``Killed``, Rust's or C++'s allocation
  abort: :attr:`Rule.dies`), or it sits inside a traceback: its own line or one
  of the few lines before it in the same stream and rank is a traceback header,
  a frame (CPython, IPython or Rich style), a caret line, a chained-exception
  banner or an exception line.  ``feed`` returns it at once.
* **recovered**: the line itself says the program handles it (``caught``,
  ``retrying``, ``skipping`` ..., :data:`~dsplan.logs.rules.RECOVERY`), or the
  next line of the same stream does.  Never returned by ``feed``.
* **pending**, otherwise (a bare OOM line: logged by hand, NCCL's ``Cuda failure
  'out of memory'`` warning, a pasted excerpt).  It becomes confirmed, and is
  returned by ``feed`` on the confirming line, if within :data:`CONFIRM_SECONDS`
  (live, on the classifier's clock) or :data:`CONFIRM_LINES` (a saved log read
  without a clock) any stream prints a traceback header, an exception or
  launcher failure line (a rule of weight >= 1: ``ChildFailedError``, ``exitcode``,
  ``Aborted``, ...) or another confirmed OOM.  A recovery word on the same stream,
  or a completion marker, makes it recovered.  Past the horizon it stays
  unconfirmed if its stream went on printing; live, a stream that fell silent
  after it (its rank died, or hangs in a collective) is confirmed by
  :meth:`Classifier.tick`, which the supervisor calls whenever output is quiet.

:meth:`Classifier.conclude` then decides: a confirmed OOM wins over everything;
below that, a clean exit (code 0) is a success whatever else was logged; an OOM still
pending when the process ended (the log stops right after it) is the verdict;
an unconfirmed or recovered OOM is the verdict only when the process failed
(exit code known and not 0) and nothing more specific than a launcher's "a
child failed" line explains the failure.  A saved log with no exit code and
only recovered or expired OOMs is therefore *not* an OOM: it reads as the rest
of the log reads (a success marker, another error, or ``unknown``).

The launcher kills on what ``feed`` or ``tick`` returns and concludes with the
exit code, which turns a pending OOM into the verdict.
:attr:`Classifier.pending` shows the OOM line still waiting and
:attr:`Classifier.survived` the first one the run went on after, for a report.
A program that prints the full traceback of an OOM it then recovers from is
treated as dying; that is the price of killing at once on real tracebacks.

How
---
What a line can prove is written down in :mod:`dsplan.logs.rules`; this module
applies that table to a stream, in small steps: cut a line into the pieces a
terminal would show (:func:`_segments`), remember the last few lines of each
stream or rank (:class:`_Window`), match the rules against a line or a message
split over two lines (:func:`_match`, :func:`_match_split`), sort OOM lines as
above (:meth:`Classifier._settle`), and keep the tally that
:meth:`Classifier.conclude` reads (:class:`_Tally`).

Standard library only: this module is imported by the launcher's hot loop and
by ``dsplan diagnose``; it must never pull in torch, DeepSpeed or
LLaMA-Factory.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from dsplan.codes import OOM_VERDICTS, Verdict
from dsplan.logs.rules import (
    DEATH_RULES,
    ECHO_END,
    ECHO_MAX_LINES,
    ECHO_START,
    PINNED_CONTEXT,
    PINNED_ELIGIBLE,
    RECORD_START,
    RECOVERY,
    RULES,
    SAMPLE,
    SPLIT_WORDS,
    SUCCESS_RULES,
    TRACEBACK_CONTEXT,
    TRACEBACK_START,
    TRIGGER_WORDS,
    WEIGHTS,
    Rule,
    clean_line,
    guess_backend,
    has_any,
    rank_prefix,
)

GPU_OOM, HOST_OOM, NOT_OOM, SUCCESS = Verdict.GPU_OOM, Verdict.HOST_OOM, Verdict.NOT_OOM, Verdict.SUCCESS
STALLED, INTERRUPTED, UNKNOWN = Verdict.STALLED, Verdict.INTERRUPTED, Verdict.UNKNOWN

#: Regexes only ever see this many characters from the start of a line (plus a
#: short tail of very long lines), so a 1 MB line costs no more than a short one.
SCAN_CHARS = 4096
#: Extra characters taken from the end of a line longer than SCAN_CHARS.
TAIL_CHARS = 1024
#: Longest evidence string kept in a Finding.
EVIDENCE_CHARS = 500
#: Lines remembered per output stream (used for split messages and context).
WINDOW_LINES = 6
#: Findings kept in :attr:`Classifier.findings`; later ones are still counted
#: for the verdict but not stored, so a log that repeats one error a million
#: times does not grow memory.
MAX_FINDINGS = 200
#: A carriage-return-separated line with more segments than this is reduced to
#: its first and last few segments (they are progress-bar redraws).
MAX_CR_SEGMENTS = 8
#: How long a bare OOM line waits for a traceback or a failure to confirm it, on the live clock.
CONFIRM_SECONDS = 5.0
#: The same horizon for a saved log read without a clock, in lines (any stream).
CONFIRM_LINES = 50
#: Bare OOM lines waiting at once; the oldest one beyond this stops waiting (it stays unconfirmed).
MAX_PENDING = 16


@dataclass(frozen=True)
class Finding:
    """One decisive line: what it proves, the line itself and where it points."""

    verdict: str          # one of the constants above
    evidence: str         # the deciding line, without rank prefixes and ANSI codes, at most ~500 chars
    backend: str | None  # "cuda", "rocm", "npu", "xpu", "mps", "cpu" or None
    rule: str             # name of the rule that matched


def _evidence(text: str) -> str:
    text = text.strip()
    if len(text) > EVIDENCE_CHARS:
        return text[:EVIDENCE_CHARS - 1] + "\u2026"
    return text


# --------------------------------------------------------------------------- normalise


def _segments(line: str) -> list[str]:
    """The pieces of one line a terminal would show in turn: carriage returns
    separate progress-bar redraws, and only the first and last few are kept."""
    if "\r" not in line:
        return [line]
    segments = [s for s in line.split("\r") if s.strip()]
    if len(segments) > MAX_CR_SEGMENTS:
        half = MAX_CR_SEGMENTS // 2
        segments = segments[:half] + segments[-half:]
    return segments


# --------------------------------------------------------------------------- per-stream window


class _Window:
    """What the classifier remembers about one output stream (one rank): its last
    few lines, and whether it is in the middle of an echoed training example."""

    __slots__ = ("recent", "in_echo", "echo_lines", "lines")

    def __init__(self) -> None:
        self.recent: deque[str] = deque(maxlen=WINDOW_LINES)
        self.in_echo = False
        self.echo_lines = 0
        self.lines = 0  # lines this stream printed so far: a stream that goes on is alive

    def is_user_data(self, text: str) -> bool:
        """Is this cleaned line part of a data sample rather than a log record?
        Follows LLaMA-Factory's tokenized-example echo from its header to the next
        log record (or ECHO_MAX_LINES lines), and spots single-line samples."""
        if self.in_echo:
            self.echo_lines += 1
            if ECHO_END.match(text) or self.echo_lines > ECHO_MAX_LINES:
                self.in_echo = False
            elif not ECHO_START.match(text):
                return True
        if ECHO_START.match(text):
            self.in_echo, self.echo_lines = True, 0
            self.recent.clear()
            return True
        return ("<" in text or "{" in text[:3] or "[INST]" in text) and SAMPLE.search(text) is not None


# --------------------------------------------------------------------------- match the rules table


def _finding(rule: Rule, matched: str, shown: str, window: _Window) -> Finding:
    """The Finding for a rule hit; a bare CUDA/HIP allocation error right after a
    pinned-memory call is a host OOM, and a GPU rule without a backend guesses one."""
    verdict, backend, name = rule.verdict, rule.backend, rule.name
    if verdict == GPU_OOM:
        if name in PINNED_ELIGIBLE and any(PINNED_CONTEXT.search(p) for p in window.recent):
            verdict, backend, name = HOST_OOM, "cpu", "pinned_host_alloc"
        elif backend is None:
            backend = guess_backend(matched)
    return Finding(verdict, _evidence(shown), backend, name)


def _match(text: str, window: _Window) -> Finding | None:
    """The first rule that matches one cleaned line, as a Finding."""
    low = text.lower()
    if not has_any(low, TRIGGER_WORDS):
        return None
    for rule in RULES:
        if has_any(low, rule.needles) and rule.pattern.search(text):
            return _finding(rule, text, text, window)
    return None


def _match_split(prev: str, text: str, window: _Window) -> Finding | None:
    """An OOM message that the writer split across ``prev`` and this line: the
    rule must match across the seam, and only OOM rules count."""
    if not has_any(prev[-48:].lower(), SPLIT_WORDS) or RECORD_START.match(text):
        return None
    joined = prev + text[:512]
    cut = len(prev)
    low = joined.lower()
    if not has_any(low, TRIGGER_WORDS):
        return None
    for rule in RULES:
        m = rule.pattern.search(joined) if has_any(low, rule.needles) else None
        if m is None or not (m.start() < cut < m.end()):
            continue
        if rule.verdict not in OOM_VERDICTS:
            return None
        shown = (prev if len(prev) <= 300 else "\u2026" + prev[-300:]) + " " + text
        return _finding(rule, joined, shown, window)
    return None


def _match_recent(text: str, window: _Window) -> tuple[Finding | None, int]:
    """An OOM message torn over the last line or two of this stream and ``text``, and how many of
    the remembered lines it took (they are part of the message, not its context)."""
    recent = window.recent
    if not recent:
        return None, 0
    found = _match_split(recent[-1], text, window)
    if found is not None:
        return found, 1
    if len(recent) >= 2 and len(recent[-1]) < 200:
        # a message torn into three pieces: the middle piece is short
        return _match_split(recent[-2] + recent[-1], text, window), 2
    return None, 0


def _success_marker(text: str) -> Finding | None:
    """The completion marker on this line, if it is one."""
    if "*****" not in text and not text.startswith(("Training", "{")) and "exits successfully" not in text:
        return None
    for name, pattern in SUCCESS_RULES:
        if pattern.search(text):
            return Finding(SUCCESS, _evidence(text), None, name)
    return None


# --------------------------------------------------------------------------- tally a verdict


class _Tally:
    """Everything the verdict depends on: the first confirmed OOM, the first OOM
    that was never confirmed, the weightiest other failure, a completion marker,
    and the findings list shown to people."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.first_oom: Finding | None = None
        self.unconfirmed: Finding | None = None
        self.oom_backends: dict[str, str | None] = {}
        self.best_other: Finding | None = None
        self.best_weight = -1
        self.success: Finding | None = None

    def record(self, finding: Finding) -> None:
        """List one finding; a not-OOM one also counts as evidence (OOMs count once sorted)."""
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)
        if finding.verdict in OOM_VERDICTS:
            if finding.backend is not None:
                self.oom_backends.setdefault(finding.verdict, finding.backend)
            return
        weight = WEIGHTS[finding.rule]
        if weight > self.best_weight:
            self.best_weight, self.best_other = weight, finding

    def confirm(self, finding: Finding) -> None:
        """An OOM that killed (or is killing) the run."""
        if self.first_oom is None:
            self.first_oom = finding

    def note_unconfirmed(self, finding: Finding) -> None:
        """An OOM line the run went on after (recovered, or never confirmed in time)."""
        if self.unconfirmed is None:
            self.unconfirmed = finding

    def note_success(self, finding: Finding) -> None:
        """Keep the first completion marker, unless LLaMA-Factory's own comes later."""
        if self.success is None or finding.rule == "lf_train_metrics":
            self.success = finding

    def _oom(self, first: Finding) -> Finding:
        """The first OOM, with a backend borrowed from a later line of the same kind if it named none."""
        if first.backend is None:
            backend = self.oom_backends.get(first.verdict)
            if backend is not None:
                first = replace(first, backend=backend)
        return first

    def _other(self) -> Finding | None:
        """The weightiest not-OOM evidence, unless it is only informational."""
        return self.best_other if self.best_other is not None and self.best_weight >= 1 else None

    def conclude(self, exit_code: int | None, pending: Finding | None) -> Finding:
        """See the module docstring: confirmed OOM, clean exit, pending OOM, then the rest."""
        if self.first_oom is not None:
            return self._oom(self.first_oom)
        if exit_code == 0:
            return self.success or Finding(SUCCESS, "process exited with code 0", None, "exit_code")
        if pending is not None:
            return self._oom(pending)
        if exit_code in (-9, 137):
            return Finding(HOST_OOM, f"process exited with code {exit_code} (killed by SIGKILL)", "cpu",
                           "exit_code_sigkill")
        other = self._other()
        if exit_code is None:
            return other or self.success or Finding(UNKNOWN, "", None, "no_evidence")
        if self.unconfirmed is not None and (other is None or self.best_weight <= 1):
            return self._oom(self.unconfirmed)
        return other or Finding(NOT_OOM, f"process exited with code {exit_code}", None, "exit_code")


@dataclass
class _Pending:
    """A bare OOM line waiting to be confirmed: which stream it came from and when (clock or line)."""

    finding: Finding
    window: _Window
    born: float
    lines_then: int = 0  # the stream's line count when the OOM line came

    @property
    def silent_since(self) -> bool:
        """The stream printed nothing after the OOM line: its rank died or hangs in a collective."""
        return self.window.lines == self.lines_then


def _in_traceback(text: str, window: _Window, joined: int = 0) -> bool:
    """Is this OOM line part of a traceback (its own line, or the few lines before it in its stream,
    leaving out the ``joined`` last ones that are the first pieces of the message itself)?"""
    if TRACEBACK_START.search(text):
        return True
    context = list(window.recent)
    for previous in context[:len(context) - joined]:
        if TRACEBACK_CONTEXT.search(previous):
            return True
    return False


# --------------------------------------------------------------------------- the classifier


class Classifier:
    """Streaming log classifier; one instance per training attempt.

    Feed lines in the order they arrive (all ranks interleaved is fine);
    :meth:`feed` returns a Finding as soon as an OOM is confirmed (see the
    module docstring).  ``clock`` times how long a bare OOM line waits for its
    confirmation: ``time.monotonic`` (the default) for a live run, ``None`` for
    a saved log, where the wait is counted in lines instead.
    """

    def __init__(self, clock: Callable[[], float] | None = time.monotonic) -> None:
        self._tally = _Tally()
        self._windows: dict[tuple[str | None, str], _Window] = {}
        self._clock = clock
        self._pending: list[_Pending] = []
        self._lines = 0

    @property
    def findings(self) -> list[Finding]:
        """Every notable line so far (OOM and not-OOM evidence), oldest first, at most MAX_FINDINGS."""
        return list(self._tally.findings)

    @property
    def survived(self) -> Finding | None:
        """The first OOM line the run went on after (recovered, or never confirmed in time), if any."""
        self._expire()
        return self._tally.unconfirmed

    @property
    def pending(self) -> Finding | None:
        """The oldest OOM line still waiting for a traceback or a failure to confirm it, if any."""
        self._expire()
        return self._pending[0].finding if self._pending else None

    def feed(self, line: str, stream: str | None = None) -> Finding | None:
        """Classify one line as it arrives.

        ``stream`` optionally names where the line came from (say "stdout" or
        "stderr"); lines of different streams or ranks are never joined.
        Returns the Finding when this line proves, or confirms, a GPU or host
        OOM; the Finding is the OOM line's own.  Else None.
        """
        if not line:
            return None
        result: Finding | None = None
        for segment in _segments(line):
            found = self._feed_segment(segment, stream)
            if found is not None and result is None:
                result = found
        return result

    def tick(self) -> Finding | None:
        """Called by a live supervisor while output is quiet.  A bare OOM line whose stream has printed
        nothing since, for the whole confirmation wait, is confirmed and returned: its rank died or
        hangs in a collective, and waiting for the stall watchdog would hold every GPU for nothing."""
        if self._clock is None or not self._pending:
            return None
        now = self._clock()
        due = [p for p in self._pending if now - p.born > CONFIRM_SECONDS and p.silent_since]
        if not due:
            return None
        self._pending = [p for p in self._pending if p not in due]
        for p in due:
            self._tally.confirm(p.finding)
        return due[0].finding

    def conclude(self, exit_code: int | None) -> Finding:
        """The verdict once the process has ended (``exit_code`` None: a bare log, exit unknown)."""
        return self._tally.conclude(exit_code, self.pending)

    def _window(self, head: str, stream: str | None) -> _Window:
        """The window of the stream and rank this raw line belongs to."""
        key = (stream, rank_prefix(head))
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        return window

    def _feed_segment(self, raw: str, stream: str | None) -> Finding | None:
        """Classify one terminal-visible piece of a line; returns a confirmed OOM Finding or None."""
        head = raw[:SCAN_CHARS]
        window = self._window(head, stream)
        text = clean_line(head)
        tail = clean_line(raw[-TAIL_CHARS:]) if len(raw) > SCAN_CHARS else ""
        if not text and not tail:
            return None
        self._lines += 1
        if window.is_user_data(text):
            if text.startswith(("{'train_runtime'", '{"train_runtime"')):
                self._marker(text)  # ms-swift writes its end-of-training summary as a JSON line
            return None
        found, joined = _match(text, window), 0
        if found is None and tail:
            found = _match(tail, window)
        if found is None:
            found, joined = _match_recent(text, window)
        in_trace = found is not None and found.verdict in OOM_VERDICTS and _in_traceback(text, window, joined)
        if found is None:
            self._marker(text)
        window.recent.append(text[:SCAN_CHARS])
        result = self._settle(found, text, window, in_trace)
        window.lines += 1
        return result

    def _marker(self, text: str) -> None:
        """Note a completion marker; an OOM line still waiting is then one the run survived."""
        marker = _success_marker(text)
        if marker is not None:
            self._tally.note_success(marker)
            self._drop_pending()

    def _settle(self, found: Finding | None, text: str, window: _Window, in_trace: bool) -> Finding | None:
        """Sort a matched line (module docstring); returns the OOM it confirms, if any."""
        if self._pending:
            self._expire()
        if found is None:
            if self._pending and TRACEBACK_START.search(text):
                return self._confirm_pending()
            if self._pending and RECOVERY.search(text):
                self._drop_pending(window)
            return None
        self._tally.record(found)
        if found.verdict not in OOM_VERDICTS:
            return self._confirm_pending() if self._pending and WEIGHTS[found.rule] >= 1 else None
        window.recent.clear()  # a proven message must not be joined again with the next line
        if found.rule in DEATH_RULES or in_trace:
            earlier = self._confirm_pending()  # a bare OOM just before a death or traceback caused it
            self._tally.confirm(found)
            return earlier or found
        if RECOVERY.search(text):
            self._tally.note_unconfirmed(found)
        else:
            self._pending.append(_Pending(found, window, self._now(), window.lines + 1))
            if len(self._pending) > MAX_PENDING:
                self._tally.note_unconfirmed(self._pending.pop(0).finding)
        return None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else float(self._lines)

    def _expire(self) -> None:
        """Bare OOM lines past the confirmation horizon stop waiting; they stay unconfirmed."""
        horizon = CONFIRM_SECONDS if self._clock is not None else float(CONFIRM_LINES)
        now = self._now()
        keep = []
        for p in self._pending:
            # live, a stream silent since its OOM line is left for tick() to confirm
            if now - p.born > horizon and (self._clock is None or not p.silent_since):
                self._tally.note_unconfirmed(p.finding)
            else:
                keep.append(p)
        self._pending = keep

    def _confirm_pending(self) -> Finding | None:
        """Confirm every waiting OOM line; returns the oldest."""
        if not self._pending:
            return None
        waiting, self._pending = self._pending, []
        for p in waiting:
            self._tally.confirm(p.finding)
        return waiting[0].finding

    def _drop_pending(self, window: _Window | None = None) -> None:
        """The run went on past these OOM lines (all of them, or those of one stream)."""
        keep = []
        for p in self._pending:
            if window is None or p.window is window:
                self._tally.note_unconfirmed(p.finding)
            else:
                keep.append(p)
        self._pending = keep


def classify_text(text: str, exit_code: int | None = None) -> Finding:
    """Classify a whole log held in memory; ``exit_code`` None means the exit status is unknown."""
    clf = Classifier(clock=None)
    for line in text.split("\n"):
        clf.feed(line)
    return clf.conclude(exit_code)


__all__ = [
    "GPU_OOM", "HOST_OOM", "NOT_OOM", "SUCCESS", "STALLED", "INTERRUPTED", "UNKNOWN", "OOM_VERDICTS",
    "Finding", "Rule", "RULES", "Classifier", "classify_text", "clean_line", "guess_backend",
]
