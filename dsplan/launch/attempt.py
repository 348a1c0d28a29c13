"""Run one training attempt and end it the moment its fate is known.

:func:`run_attempt` starts the training command (``llamafactory-cli train ...``)
under a guardian (:mod:`dsplan.launch.guard`, which ends the command's whole
tree if dsplan itself dies) in a session of its own, and supervises it until it
ends.  The supervisor's steps, one method each: start the child; watch it (its
output goes through :class:`dsplan.launch.streams.OutputReader` to the attempt
log, the terminal and the classifier, ``dsplan.logs.classifier.Classifier``);
decide, on every turn of the watch loop, whether the attempt is over and why
(:class:`dsplan.codes.EndReason`); tear down what is left of it
(:class:`dsplan.launch.proctree.ProcessTree`); and conclude with an
:class:`AttemptOutcome`.

Output never holds up that loop: the log and the terminal are written by
threads of their own through bounded queues (a terminal that stops reading
loses output, counted, never the supervision).  While the attempt runs, its
processes are listed in the run folder (:class:`dsplan.launch.orphans.TreeRecord`)
so that a later dsplan can end them if this one is killed outright.

The attempt ends

* when a line proves an out-of-memory death: every process of the attempt is
  sent SIGTERM at once, and SIGKILL after a short grace period, because the
  ranks still alive would otherwise sit in an NCCL collective until its timeout,
  holding their GPU memory (end reason ``oom``);
* when nothing is printed and the trainer log does not move for
  ``stall_timeout`` seconds (``stalled``);
* when the caller sets ``stop_event`` -- typically from a SIGINT/SIGTERM handler
  in the runner, see :func:`stop_on_signals` (``interrupted``);
* otherwise when the child exits (``exited``; the verdict is then
  ``classifier.conclude(code)``, or ``interrupted`` when a SIGTERM that dsplan
  did not send ended it), or exits but leaves processes holding its
  output open for too long (``leftovers``: they are killed, the verdict is
  still the classifier's).

When the command is an ``srun`` step over several nodes (``labelled``), each
line's task label is cut off before the classifier reads it, every task is a
stream of its own, and the outcome names the task and rank that printed the
evidence; the caller's ``before_kill`` ends the step on every node before the
local processes are signalled.

POSIX only (sessions, process groups, ``killpg``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Optional

from dsplan.codes import OOM_VERDICTS, EndReason, Verdict
from dsplan.launch.guard import start_guarded
from dsplan.launch.measure import HostPeaks
from dsplan.launch.orphans import TreeRecord
from dsplan.launch.proctree import KILL_WAIT, ProcessTree, exited, kill_group, pipe_holders, running
from dsplan.launch.progress import ProgressLine, ProgressWatcher, format_progress
from dsplan.launch.slurm import parse_label
from dsplan.launch.streams import AttemptLog, OutputReader, echo_for
from dsplan.logs.classifier import Finding
from dsplan.logs.rules import clean_line, rank_prefix

#: After the main child exits, how long to keep reading output that descendants
#: still hold open before they are treated as leftovers and killed.
_DRAIN_AFTER_EXIT = 5.0
#: After a kill, how long to keep reading the last output (torchrun's error report).
_DRAIN_AFTER_KILL = 2.0
#: How often the list of the attempt's processes is brought up to date while it runs.
_REFRESH_EVERY = 1.0
#: End reasons for which dsplan signals the attempt's processes itself.
_KILLING = frozenset({EndReason.OOM, EndReason.STALLED, EndReason.INTERRUPTED, EndReason.LEFTOVERS})
#: End reasons that count as dsplan ending the attempt (``AttemptOutcome.killed``).
_ENDED_BY_DSPLAN = frozenset({EndReason.OOM, EndReason.STALLED, EndReason.INTERRUPTED})
#: At the end of an attempt, how long the terminal may take to show the rest of its output.
_ECHO_WAIT = 1.0
#: At the end of an attempt, how long the disk may take to take the rest of the log.
_LOG_WAIT = 10.0
#: The guardian's own grace between SIGTERM and SIGKILL when dsplan has died.
_ORPHAN_GRACE = 1.0
#: Recent lines kept (their first characters) to tell which task and rank printed the evidence.
_ORIGIN_LINES = 2048
_ORIGIN_CHARS = 600

__all__ = ["AttemptOutcome", "StartError", "now_iso", "run_attempt", "running", "stop_on_signals"]


class StartError(OSError):
    """The attempt could not start: its log could not be opened or its command executed."""


def now_iso() -> str:
    """Local time with its UTC offset, e.g. ``2025-01-31T14:02:11+08:00``."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class AttemptOutcome:
    """How one attempt ended.  ``finding`` is the final verdict (a ``dsplan.logs.classifier.Finding``)."""

    exit_code: Optional[int]  # the child's return code; negative = killed by that signal
    finding: Finding
    started: str
    ended: str
    killed: bool  # dsplan ended the attempt itself (kill_reason oom, stalled or interrupted)
    # Why the attempt ended: "exited" (by itself), or why dsplan signalled its processes: "oom",
    # "stalled", "interrupted", or "leftovers" (the child exited by itself but left processes
    # holding its output open: they were killed, the verdict is still the classifier's, and
    # killed stays False).
    kill_reason: EndReason = EndReason.EXITED
    pid: Optional[int] = None  # pid of the guardian (= the attempt's process group and session id)
    command_pid: Optional[int] = None  # pid of the training command under the guardian
    findings: list = field(default_factory=list)  # everything the classifier reported on the way
    last_step: Optional[int] = None  # last training step seen in trainer_log.jsonl
    decided_at: Optional[float] = None  # time.time() when dsplan decided to end the attempt
    cleared_at: Optional[float] = None  # time.time() when none of its processes was left
    survivors: list = field(default_factory=list)  # pids SIGKILL could not remove (normally empty)
    echo_dropped: int = 0  # bytes of output the terminal did not take in time (not shown; in the log)
    log_dropped: int = 0  # bytes the disk did not take in time (marked in the log)
    log_error: Optional[str] = None  # why the log stopped growing (a full disk), or None
    evidence_task: Optional[int] = None  # the srun task (node index) that printed the evidence, if labelled
    evidence_rank: Optional[int] = None  # the global rank of its ``[rankN]:`` prefix, if any
    before_kill_result: object = None  # what ``before_kill`` returned (a Slurm StepEnd), if it ran
    host_peak_bytes: Optional[int] = None  # summed VmHWM of the attempt's processes dsplan saw

    @property
    def verdict(self) -> str:
        return self.finding.verdict


# --------------------------------------------------------------------------- stop requests


@contextmanager
def stop_on_signals(stop_event: threading.Event,
                    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """While active, the given signals set ``stop_event`` instead of killing dsplan,
    so :func:`run_attempt` can take the attempt's processes down with it.  Must be
    entered from the main thread (a rule of :func:`signal.signal`).  Previous
    handlers are restored on exit."""
    previous = {}

    def handler(signum, frame):
        stop_event.set()

    for sig in signals:
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread, or a signal this OS lacks
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- supervision


class _Tripwire:
    """Feeds each output line to the classifier and remembers the first line that
    proves an OOM, until it is disarmed (once the attempt is being ended anyway).

    With ``labelled`` (the output of an ``srun --label`` step) each line starts with
    the task id; it is cut off before the classifier sees the line, and each task's
    lines are their own streams, so two nodes' lines are never read as one traceback."""

    def __init__(self, classifier, err, labelled: bool = False):  # err: an Echo or QueuedEcho
        self.classifier = classifier
        self.err = err
        self.labelled = labelled
        self.armed = True
        self.fatal: Optional[Finding] = None
        self.fatal_at: Optional[float] = None  # time.time() of that line
        self._error_reported = False
        self._recent: deque[tuple[Optional[int], str]] = deque(maxlen=_ORIGIN_LINES)

    def feed(self, line: str, stream: str) -> None:
        task = None
        if self.labelled:
            task, line = parse_label(line)
            if task is not None:
                stream = f"{stream}:{task}"
        self._recent.append((task, line[:_ORIGIN_CHARS]))
        try:
            finding = self.classifier.feed(line, stream=stream)
        except Exception as e:  # a classifier bug must not leave the training unsupervised
            if not self._error_reported:
                self._error_reported = True
                self.err.write(f"\n[dsplan] log classifier failed on a line ({type(e).__name__}: {e}); "
                               "continuing without it for that line\n")
            return
        self._arm(finding)

    def tick(self) -> None:
        """Let the classifier confirm an OOM line that no further output can confirm."""
        self._arm(self.classifier.tick())

    def _arm(self, finding: Optional[Finding]) -> None:
        if finding is not None and self.armed and self.fatal is None and finding.verdict in OOM_VERDICTS:
            self.fatal = finding
            self.fatal_at = time.time()

    def origin(self, finding: Optional[Finding]) -> tuple[Optional[int], Optional[int]]:
        """Which task (srun's label) and which rank (``[rankN]:``) printed the evidence of
        ``finding``, as far as the recent lines tell; None where unknown."""
        key = (finding.evidence if finding is not None else "").rstrip("\u2026")[:120]
        if not key:
            return None, None
        for task, text in reversed(self._recent):
            if key in text or key in clean_line(text):
                return task, _rank_of(text)
        return None, None


def _rank_of(text: str) -> Optional[int]:
    """N of a ``[rankN]:`` prefix (torch's global rank); None without one."""
    prefix = rank_prefix(text)
    digits = prefix[len("[rank"):].split("]", 1)[0].strip() if prefix.lower().startswith("[rank") else ""
    return int(digits) if digits.isdigit() else None


class _Supervisor:
    """One attempt from start to outcome; :func:`run_attempt` calls the steps in order:
    :meth:`start`, :meth:`attach`, :meth:`watch`, :meth:`tear_down`, :meth:`reap`,
    :meth:`close`, :meth:`conclude` (and :meth:`abort` if an exception escapes)."""

    def __init__(self, classifier, trainer_log: Optional[Path], *, stall_timeout: Optional[float], grace: float,
                 echo: bool, progress: bool, stop_event: Optional[threading.Event], progress_interval: float,
                 poll_interval: float, tree_record: Optional[TreeRecord] = None, labelled: bool = False,
                 before_kill: Optional[Callable[[int], object]] = None):
        self.classifier = classifier
        self.stall_timeout = stall_timeout
        self.grace = grace
        self.stop_event = stop_event
        self.poll_interval = poll_interval
        self.out = echo_for(sys.stdout, echo)
        self.err = echo_for(sys.stderr, echo)
        self.trip = _Tripwire(classifier, self.err, labelled)
        self.before_kill = before_kill
        self.before_kill_result: object = None
        # the progress line shares stderr's writer, so it is cleared before child text lands
        notes = self.err if echo else echo_for(sys.stderr, True)
        self.progress = ProgressLine(notes, progress and trainer_log is not None, progress_interval)
        self.notes = notes
        self.watcher = ProgressWatcher(trainer_log) if trainer_log is not None else None
        self.watch_every = 1.0 if stall_timeout is None else max(0.05, min(1.0, stall_timeout / 4))
        self.record = tree_record
        self.host_peaks = HostPeaks()
        self.proc: Optional[subprocess.Popen] = None
        self.command_pid: Optional[int] = None
        self.log: Optional[AttemptLog] = None
        self.tree: Optional[ProcessTree] = None
        self.reader: Optional[OutputReader] = None
        self.started = ""
        self.reason = EndReason.EXITED
        self.decided_at: Optional[float] = None
        self.cleared_at: Optional[float] = None
        self.exit_code: Optional[int] = None
        self.survivors: list[int] = []
        # watch-loop clocks (time.monotonic())
        self.last_activity = self.next_watch = self.next_refresh = 0.0
        self.exited_at: Optional[float] = None

    # -- start ------------------------------------------------------------------------------

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        """Open the attempt log and start the child under its guardian, in a session of its own."""
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = AttemptLog(log_path)
        except OSError as e:
            raise StartError(e.errno, e.strerror or str(e), e.filename) from e
        self.started = now_iso()
        try:
            self.proc, self.command_pid = start_guarded(argv, env, cwd, grace=min(self.grace, _ORPHAN_GRACE))
        except OSError as e:
            self.log.close(_LOG_WAIT)
            raise StartError(e.errno, e.strerror or str(e), e.filename) from e
        except BaseException:
            self.log.close(_LOG_WAIT)
            raise

    def attach(self) -> None:
        """Start following the child's processes and reading its output."""
        self.tree = ProcessTree(self.proc.pid)
        self._keep_record()
        self.reader = OutputReader([(self.proc.stdout, "stdout", self.out), (self.proc.stderr, "stderr", self.err)],
                                   self.log, self.trip.feed, self.progress.clear)

    def _keep_record(self) -> None:
        """Bring the run folder's list of the attempt's processes, and their memory peaks, up to date."""
        pids = [p.pid for p in self.tree.alive()]
        self.host_peaks.sample(pids)
        if self.record is not None:
            self.record.update(pids)

    # -- watch and decide -------------------------------------------------------------------

    def watch(self) -> EndReason:
        """Read, look and decide until the attempt is over; records and returns why."""
        now = time.monotonic()
        self.last_activity = self.next_watch = now
        self.next_refresh = now + _REFRESH_EVERY
        while True:
            reason = self._decide()
            if reason is not None:
                self.reason = reason
                return reason

    def _decide(self) -> Optional[EndReason]:
        """One turn of the watch loop: the reason the attempt is over, or None to go on."""
        if self.stop_event is not None and self.stop_event.is_set():
            return EndReason.INTERRUPTED
        if self.reader.pump(self.poll_interval):
            self.last_activity = time.monotonic()
        else:
            self.trip.tick()  # quiet: a bare OOM line whose rank fell silent is confirmed now
        if self.trip.fatal is not None:
            return EndReason.OOM
        now = time.monotonic()
        self._show_progress(now)
        reason = self._exit_reason(now)
        if reason is not None:
            return reason
        if self.stall_timeout is not None and now - self.last_activity >= self.stall_timeout:
            return EndReason.STALLED
        if now >= self.next_refresh:  # learn new ranks/workers while their parents are alive
            self.next_refresh = now + _REFRESH_EVERY
            self.tree.refresh()
            self._keep_record()
            self._report_log_problem()
        return None

    def _report_log_problem(self) -> None:
        problem = self.log.problem()
        if problem is not None:
            self.progress.clear()
            self.notes.write(f"\n{problem}\n")

    def _show_progress(self, now: float) -> None:
        """Poll the trainer log now and then (a new step is activity) and keep the progress line up."""
        if self.watcher is not None and now >= self.next_watch:
            self.next_watch = now + self.watch_every
            if self.watcher.poll():
                self.last_activity = now
                self.progress.set(format_progress(self.watcher.state))
        if not self.reader.mid_line:
            self.progress.redraw()
        self.progress.tick()

    def _exit_reason(self, now: float) -> Optional[EndReason]:
        """``exited`` once the child is gone and its output closed; ``leftovers`` when
        something else still holds the output open too long after it exited."""
        if self.exited_at is None and exited(self.proc):
            self.exited_at = now
        if self.exited_at is None:
            return None
        if not self.reader.open:
            return EndReason.EXITED
        if now - self.exited_at >= _DRAIN_AFTER_EXIT:
            return EndReason.LEFTOVERS
        return None

    # -- tear down --------------------------------------------------------------------------

    def _call_before_kill(self) -> None:
        """The caller's own way to end what the process tree does not reach (the other nodes
        of a Slurm step), before the tree is signalled; a failure there must not stop the kill."""
        if self.before_kill is None or self.command_pid is None:
            return
        try:
            self.before_kill_result = self.before_kill(self.command_pid)
        except Exception as e:
            self.notes.write(f"\n[dsplan] warning: ending the attempt's remote part failed ({type(e).__name__}: {e})\n")

    def tear_down(self) -> list[int]:
        """End every process the attempt still has, as its end reason asks; returns the
        pids SIGKILL could not remove (normally none)."""
        if self.reason in _KILLING:
            self.trip.armed = False
            self.decided_at = self.trip.fatal_at if self.reason == EndReason.OOM else time.time()
            self.host_peaks.sample(p.pid for p in self.tree.alive())  # the peaks that led to the end
            self._call_before_kill()
            self.survivors = self.tree.kill(self.grace, pump=self.reader.pump)
        elif self.tree.has_leftovers():  # the child exited by itself but left something running
            self.survivors = self.tree.kill(min(self.grace, 1.0), pump=self.reader.pump)
        self.reader.drain(0.2)
        if self.reader.open:
            # Still no end-of-file although every known process is gone: a process
            # dsplan never saw (say a rank whose torchrun died before dsplan looked)
            # holds the output pipes.
            holders = pipe_holders(self.reader.pipe_inodes())
            if holders:
                self.tree.adopt(holders)
                self.survivors = self.tree.kill(self.grace, pump=self.reader.pump)
            self.reader.drain(_DRAIN_AFTER_KILL)
        return self.survivors

    def reap(self) -> Optional[int]:
        """The child's exit code; None if it is stuck in the kernel even after SIGKILL (a hung driver)."""
        try:
            self.exit_code = self.proc.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            self.exit_code = None
        return self.exit_code

    def abort(self) -> None:
        """An exception escaped (Ctrl-C without a handler, a bug): take the attempt down
        before it propagates."""
        try:
            self._call_before_kill()
        finally:
            self._kill_all()
        try:
            self.proc.wait(timeout=KILL_WAIT)
        except Exception:
            pass

    def _kill_all(self) -> None:
        if self.tree is None:
            kill_group(self.proc.pid)
        else:
            try:
                self.tree.kill(self.grace)
            except BaseException:
                kill_group(self.proc.pid)

    def close(self) -> None:
        """Clear the progress line, hand out the last partial lines, close pipes and log,
        let the terminal catch up (briefly), and update the run folder's process list."""
        self.progress.clear()
        try:
            if self.reader is not None:
                self.reader.close()
            else:
                for pipe in (self.proc.stdout, self.proc.stderr):
                    pipe.close()
        finally:
            self.log.close(_LOG_WAIT)
            self.cleared_at = time.time()
            self._report_log_problem()
            for echo in (self.out, self.err, self.notes):
                echo.drain(_ECHO_WAIT)
            if self.record is not None:
                self.record.finish(running(self.survivors) if self.survivors else [])

    # -- conclude ---------------------------------------------------------------------------

    def _finding(self) -> Finding:
        """The final verdict: the fatal line, the watchdog's or the stop's own, or the classifier's."""
        if self.reason == EndReason.OOM:
            return self.trip.fatal
        if self.reason == EndReason.STALLED:
            return Finding(Verdict.STALLED, f"no output and no step for {self.stall_timeout:g} s", None, "watchdog")
        if self.reason == EndReason.INTERRUPTED:
            return Finding(Verdict.INTERRUPTED, "stop requested (signal to dsplan)", None, "stop")
        concluded = self.classifier.conclude(self.exit_code)
        if concluded.verdict in OOM_VERDICTS or concluded.verdict == Verdict.SUCCESS:
            return concluded
        return self._stopped_from_outside() or concluded

    def _stopped_from_outside(self) -> Optional[Finding]:
        """A stop that reached the command before dsplan acted on it.  Under Slurm, ``scancel``
        and the time limit send SIGTERM to dsplan and to srun at the same moment, so the
        command may end by itself first; that is an interruption, not a failed training."""
        if self.stop_event is not None and self.stop_event.is_set():
            return Finding(Verdict.INTERRUPTED, "stop requested (signal to dsplan); the command had ended already",
                           None, "stop")
        if self.exit_code in (-signal.SIGTERM, 128 + signal.SIGTERM):
            return Finding(Verdict.INTERRUPTED, "the command was ended by a SIGTERM that dsplan did not send "
                           "(scancel, a job time limit, or a kill)", None, "sigterm")
        return None

    def conclude(self) -> AttemptOutcome:
        """The outcome of the finished attempt (warns about processes that survived SIGKILL)."""
        if self.watcher is not None:
            self.watcher.poll()
        ended = now_iso()
        finding = self._finding()
        if self.survivors:
            self.err.write(f"[dsplan] warning: processes {', '.join(map(str, self.survivors))} survived SIGKILL "
                           "(stuck in the kernel or a driver?)\n")
            self.err.flush()
        log_error = self.log.error
        task, rank = self.trip.origin(finding)
        return AttemptOutcome(
            exit_code=self.exit_code, finding=finding, started=self.started, ended=ended,
            killed=self.reason in _ENDED_BY_DSPLAN, kill_reason=self.reason, pid=self.proc.pid,
            command_pid=self.command_pid, findings=list(self.classifier.findings),
            last_step=self.watcher.last_step if self.watcher is not None else None,
            decided_at=self.decided_at, cleared_at=self.cleared_at, survivors=self.survivors,
            echo_dropped=self.out.dropped + self.err.dropped, log_dropped=self.log.dropped,
            log_error=None if log_error is None else (getattr(log_error, "strerror", None) or str(log_error)),
            evidence_task=task, evidence_rank=rank, before_kill_result=self.before_kill_result,
            host_peak_bytes=self.host_peaks.total(),
        )


def run_attempt(argv: list[str], env: dict[str, str], cwd: Path, log_path: Path, trainer_log: Optional[Path],
                classifier, *, stall_timeout: Optional[float] = 1800, grace: float = 3.0, echo: bool = True,
                progress: bool = True, stop_event: Optional[threading.Event] = None,
                progress_interval: float = 30.0, poll_interval: float = 0.1,
                tree_record: Optional[TreeRecord] = None, labelled: bool = False,
                before_kill: Optional[Callable[[int], object]] = None) -> AttemptOutcome:
    """Run ``argv`` once and return how it ended.

    ``argv`` is a list (never a shell string).  The child gets its own session, no
    stdin, and the given ``env``/``cwd``.  Its stdout and stderr are appended, as the
    raw bytes, to ``log_path`` (one whole line at a time per stream), echoed to
    dsplan's own stdout/stderr when ``echo``, and fed line by line to
    ``classifier.feed(line, stream)`` with stream ``"stdout"`` or ``"stderr"``.

    ``trainer_log`` is the attempt's ``<output_dir>/trainer_log.jsonl`` (it need
    not exist yet): it drives the progress line and counts as activity for the
    stall watchdog.  ``stall_timeout=None`` turns the watchdog off.

    Setting ``stop_event`` (from any thread or a signal handler) ends the attempt
    with verdict ``interrupted`` within about ``poll_interval`` seconds plus the
    teardown.  If an exception (KeyboardInterrupt included) escapes while the
    attempt runs, its processes are killed before it propagates.

    ``tree_record`` (a :class:`dsplan.launch.orphans.TreeRecord` on the run
    folder's ``processes.json``) is kept up to date with the attempt's processes
    and removed once none is left.  The guardian ends them all if dsplan dies.

    Raises :class:`StartError` (an ``OSError``) if the log cannot be opened or the
    program cannot be started (then ``filename`` is ``argv[0]``).

    ``labelled``: ``argv`` is an ``srun --label`` step; each line's task label is cut off
    before the classifier reads it, and the outcome names the task that printed the
    evidence.  ``before_kill(command_pid)`` is called whenever dsplan ends the attempt
    itself, before it signals the process tree: an srun step must be cancelled on every
    node first (a killed srun leaves its remote tasks running)."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of arguments, not a string")
    sup = _Supervisor(classifier, trainer_log, stall_timeout=stall_timeout, grace=grace, echo=echo,
                      progress=progress, stop_event=stop_event, progress_interval=progress_interval,
                      poll_interval=poll_interval, tree_record=tree_record, labelled=labelled,
                      before_kill=before_kill)
    sup.start([os.fspath(a) for a in argv], env, cwd, Path(log_path))
    try:
        sup.attach()
        sup.watch()
        sup.tear_down()
        sup.reap()
    except BaseException:
        sup.abort()
        raise
    finally:
        sup.close()
    return sup.conclude()
