"""Run one training attempt and end it the moment its fate is known.

:func:`run_attempt` starts the training command (``llamafactory-cli train ...``)
in a session of its own, reads its stdout and stderr as bytes, appends them to
the attempt log, echoes them, and feeds every line to a classifier
(``dsplan.logs.classifier.Classifier``).  When a line proves an out-of-memory death,
every process of the attempt is sent SIGTERM at once, and SIGKILL after a short
grace period: the ranks that are still alive would otherwise sit in an NCCL
collective until its timeout, holding their GPU memory.

"Every process" takes some care.  torchrun starts each rank with
``start_new_session=True``, so the ranks are not in the child's process group,
and a group kill of the child alone would leave them all running.
:class:`ProcessTree` therefore keeps a list of the child's descendants (taken
again every second, and once more just before signalling), signals every process
group among them -- the child's, each rank's with its data-loader workers, any
helper's that moved to a group of its own -- and, if the output pipes still do
not close, finds whoever holds them open.

The attempt also ends when

* nothing is printed and the trainer log does not move for ``stall_timeout``
  seconds (verdict ``stalled``);
* the caller sets ``stop_event`` -- typically from a SIGINT/SIGTERM handler in
  the runner, see :func:`stop_on_signals` (verdict ``interrupted``);
* otherwise, when the child exits: the verdict is ``classifier.conclude(code)``.

POSIX only (sessions, process groups, ``killpg``); the /proc lookups are Linux
and are skipped elsewhere.
"""

from __future__ import annotations

import codecs
import importlib
import inspect
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import psutil

from dsplan.launch.progress import ProgressWatcher, format_progress

#: Longest piece of a line handed to the classifier; longer lines are cut into pieces.
MAX_LINE = 64 * 1024
_READ_CHUNK = 64 * 1024
#: Verdicts that end an attempt the moment the classifier reports them.
_FATAL = ("gpu_oom", "host_oom")
#: After the main child exits, how long to keep reading output that descendants
#: still hold open before they are treated as leftovers and killed.
_DRAIN_AFTER_EXIT = 5.0
#: After a kill, how long to keep reading the last output (torchrun's error report).
_DRAIN_AFTER_KILL = 2.0
#: How long SIGKILL is given to take effect before dsplan gives up on a process
#: (one stuck in uninterruptible sleep inside a driver, for instance).
_KILL_WAIT = 10.0
#: How often the list of the attempt's processes is brought up to date while it runs.
_REFRESH_EVERY = 1.0
_TERM_RE = re.compile(rb"\r\n|\r|\n")


def now_iso() -> str:
    """Local time with its UTC offset, e.g. ``2025-01-31T14:02:11+08:00``."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class AttemptOutcome:
    """How one attempt ended.  ``finding`` is the final verdict (a ``dsplan.logs.classifier.Finding``)."""

    exit_code: Optional[int]  # the child's return code; negative = killed by that signal
    finding: Any
    started: str
    ended: str
    killed: bool  # dsplan ended the attempt itself (kill_reason oom, stalled or interrupted)
    # Why dsplan signalled the attempt's processes: "oom", "stalled", "interrupted", or
    # "leftovers" (the child exited by itself but left processes holding its output open:
    # they were killed, the verdict is still the classifier's, and killed stays False).
    kill_reason: Optional[str] = None
    pid: Optional[int] = None  # pid of the child (= its process group and session id)
    findings: list = field(default_factory=list)  # everything the classifier reported on the way
    last_step: Optional[int] = None  # last training step seen in trainer_log.jsonl
    decided_at: Optional[float] = None  # time.time() when dsplan decided to end the attempt
    cleared_at: Optional[float] = None  # time.time() when none of its processes was left
    survivors: list = field(default_factory=list)  # pids SIGKILL could not remove (normally empty)

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


# --------------------------------------------------------------------------- process tree


def _proc_scan(ids: set[int]) -> Optional[list[int]]:
    """Pids of live (non-zombie) processes whose process group or session id is in
    ``ids``, read from /proc in one pass; None where there is no /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    out = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()  # state ppid pgrp session ...
        if len(fields) < 4 or fields[0] in (b"Z", b"X", b"x"):
            continue
        try:
            if int(fields[2]) in ids or int(fields[3]) in ids:
                out.append(int(name))
        except ValueError:
            continue
    return out


def _members(ids: set[int]) -> list[int]:
    pids = _proc_scan(ids)
    if pids is not None:
        return pids
    out = []  # no /proc (macOS): ask per process
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in ids or os.getsid(p.pid) in ids:
                out.append(p.pid)
        except OSError:
            continue
    return out


def _pipe_holders(inodes: set[int]) -> list[int]:
    """Pids of other processes that hold one of the given pipes open (Linux /proc).
    Slow on a busy host, so only used when output pipes stay open after the
    attempt's known processes are gone: something unknown still has them."""
    want = {f"pipe:[{i}]" for i in inodes}
    me = os.getpid()
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") in want:
                    out.append(int(name))
                    break
            except OSError:
                continue
    return out


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def running(pids) -> list[int]:
    """The pids among ``pids`` still running (a zombie has released its memory: gone)."""
    out = []
    for pid in pids:
        try:
            if not _gone(psutil.Process(pid)):
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


class ProcessTree:
    """Every process that belongs to one attempt.

    That is the child (leader of its own session and process group), its
    descendants, and every member of a process group or session that one of
    them leads.  The last part matters: torchrun starts each rank with
    ``start_new_session=True``, so the ranks are *not* in the child's process
    group, and a rank's data-loader workers live in the rank's group.  A group
    kill of the child alone would leave every rank running.

    Processes are remembered as :class:`psutil.Process` objects, which refuse to
    signal a pid that has since been reused by an unrelated process.  dsplan's
    own process group and session are never signalled."""

    def __init__(self, root_pid: int):
        self.root = root_pid
        self.known: dict[int, psutil.Process] = {}
        self._me = os.getpid()
        self._mine = {0, 1, os.getpgrp(), os.getsid(0)}
        self.refresh()

    def _add(self, pid: int) -> None:
        if pid == self._me or pid in self.known:
            return
        try:
            self.known[pid] = psutil.Process(pid)
        except psutil.Error:
            pass

    def adopt(self, pids: list[int]) -> None:
        """Count these processes as part of the attempt from now on."""
        for pid in pids:
            self._add(pid)

    def _ids(self, procs: list[psutil.Process]) -> set[int]:
        """Process-group and session ids of live processes, with the root's."""
        ids = {self.root}
        for p in procs:
            try:
                ids.add(os.getpgid(p.pid))
                ids.add(os.getsid(p.pid))
            except OSError:
                pass
        return ids - self._mine

    def refresh(self) -> None:
        """Add the current descendants, and the members of their groups and sessions,
        to what is known.  Called now and then while the attempt runs, so that a
        process orphaned later (its parent died and it was re-parented away) is
        still on the list."""
        self._add(self.root)
        root = self.known.get(self.root)
        if root is not None:
            try:
                for child in root.children(recursive=True):
                    if child.pid != self._me and child.pid not in self.known:
                        self.known[child.pid] = child
            except psutil.Error:
                pass
        for pid in _members(self._ids(self.alive())):
            self._add(pid)

    def alive(self) -> list[psutil.Process]:
        """Known processes that still run (zombies hold no memory and count as gone)."""
        out = []
        for pid, p in list(self.known.items()):
            if _gone(p):
                if pid != self.root:  # the root stays: its pid is ours until we reap it
                    del self.known[pid]
                continue
            out.append(p)
        return out

    def signal(self, sig: int) -> None:
        """``sig`` to every process group in play -- the child's, each rank's, and the
        group of any descendant that moved to one of its own -- one call per group,
        so each process gets it once."""
        groups = {self.root}
        loose = []
        for p in self.alive():
            try:
                group = os.getpgid(p.pid)
            except OSError:
                continue
            if group in self._mine:  # cannot happen for a child in its own session; never killpg our own
                loose.append(p)
            else:
                groups.add(group)
        for group in sorted(groups):
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in loose:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def kill(self, grace: float, pump: Optional[Callable[[], None]] = None) -> list[int]:
        """SIGTERM everything at once; SIGKILL whatever is left after ``grace``
        seconds.  ``pump`` is called while waiting (to keep reading the pipes, so a
        dying process never blocks on a full pipe).  Returns the pids that were still
        there after SIGKILL had ``_KILL_WAIT`` seconds (normally none)."""
        self.refresh()  # snapshot before signalling: orphans still have their parent now
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + max(0.0, grace)
        nap = 0.002
        while True:
            if pump:
                pump()
            self.refresh()
            if not self.alive():
                return []
            if time.monotonic() >= deadline:
                break
            time.sleep(nap)
            nap = min(nap * 2, 0.05)
        deadline = time.monotonic() + _KILL_WAIT
        nap = 0.002
        while True:
            self.refresh()
            self.signal(signal.SIGKILL)
            if pump:
                pump()
            left = self.alive()
            if not left:
                return []
            if time.monotonic() >= deadline:
                return [p.pid for p in left]
            time.sleep(nap)
            nap = min(nap * 2, 0.05)


def _exited(proc: subprocess.Popen) -> bool:
    """Has the child exited?  Where possible, without reaping it: until dsplan
    reaps it, its pid (which is also the group id) cannot be reused."""
    if proc.returncode is not None:
        return True
    if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


# --------------------------------------------------------------------------- output handling


class _Stream:
    """Splits one pipe's bytes into lines on ``\\n``, ``\\r`` and ``\\r\\n``, cutting
    lines longer than :data:`MAX_LINE`, and decodes them as UTF-8 (bad bytes become
    U+FFFD; a character split across reads is decoded whole)."""

    def __init__(self, name: str):
        self.name = name
        self.buf = bytearray()
        self.after_cr = False  # the last piece ended in "\r" that may be half of "\r\n"
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def split(self, data: bytes, final: bool = False) -> list[tuple[bytes, bytes, bool]]:
        """(content, terminator, is_line) pieces; is_line is False for the lone
        "\\n" that completes a "\\r\\n" split across two reads."""
        pieces: list[tuple[bytes, bytes, bool]] = []
        if self.after_cr and data[:1] == b"\n":
            pieces.append((b"", b"\n", False))
            data = data[1:]
        self.after_cr = False
        self.buf += data
        pos = 0
        for m in _TERM_RE.finditer(self.buf):
            content = bytes(self.buf[pos:m.start()])
            while len(content) > MAX_LINE:
                pieces.append((content[:MAX_LINE], b"", True))
                content = content[MAX_LINE:]
            pieces.append((content, m.group(), True))
            pos = m.end()
        del self.buf[:pos]
        if pieces and not self.buf and pieces[-1][1] == b"\r":
            self.after_cr = True
        while len(self.buf) > MAX_LINE or (final and self.buf):
            pieces.append((bytes(self.buf[:MAX_LINE]), b"", True))
            del self.buf[:MAX_LINE]
        return pieces

    def decode(self, raw: bytes, final: bool = False) -> str:
        return self.decoder.decode(raw, final)


class _Echo:
    """Writes child lines to a text stream, and the progress line; never raises (a
    closed terminal or broken pipe just turns echoing off)."""

    def __init__(self, stream, enabled: bool):
        self.stream = stream
        self.enabled = enabled and stream is not None

    def write(self, text: str) -> None:
        if not self.enabled or not text:
            return
        try:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:
                enc = getattr(self.stream, "encoding", None) or "utf-8"
                self.stream.write(text.encode(enc, "replace").decode(enc, "replace"))
        except (OSError, ValueError):
            self.enabled = False

    def flush(self) -> None:
        if not self.enabled:
            return
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _ProgressLine:
    """On a terminal: one line redrawn in place, cleared before child output is
    echoed.  Otherwise: a plain line every ``interval`` seconds when it changed."""

    def __init__(self, out: _Echo, enabled: bool, interval: float):
        self.out = out
        self.enabled = enabled and out.enabled
        self.tty = self.enabled and _isatty(out.stream)
        self.interval = interval
        self.text: Optional[str] = None
        self.shown = False
        self.last_plain_text: Optional[str] = None
        self.last_plain_at = time.monotonic()

    def set(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            if text != self.text or not self.shown:
                self.text = text
                self._draw()
        else:
            self.text = text
            self.tick()

    def tick(self) -> None:
        if not self.enabled or self.tty or self.text is None:
            return
        now = time.monotonic()
        if self.text != self.last_plain_text and now - self.last_plain_at >= self.interval:
            self.out.write(f"[dsplan] {self.text}\n")
            self.out.flush()
            self.last_plain_text = self.text
            self.last_plain_at = now

    def _draw(self) -> None:
        self.out.write(f"\r\x1b[K[dsplan] {self.text}")
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.tty and self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False

    def redraw(self) -> None:
        if self.tty and self.text is not None and not self.shown:
            self._draw()


def _accepts_stream(classifier) -> bool:
    """Does ``classifier.feed`` take the optional ``stream`` keyword ("stdout"/"stderr")?
    The real classifier uses it to keep the two streams' lines apart."""
    try:
        params = inspect.signature(classifier.feed).parameters
    except (TypeError, ValueError):
        return False
    return "stream" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _make_finding(verdicts, verdict: str, evidence: str, rule: str):
    return verdicts.Finding(verdict=verdict, evidence=evidence, backend=None, rule=rule)


class _Attempt:
    """State of one running attempt; :func:`run_attempt` is the public entry point."""

    def __init__(self, proc: subprocess.Popen, log_fd: int, classifier, progress_line: _ProgressLine,
                 out: _Echo, err: _Echo):
        self.proc = proc
        self.log_fd = log_fd
        self.classifier = classifier
        self.sel = selectors.DefaultSelector()
        self.streams: dict[int, tuple[_Stream, Any, _Echo]] = {}
        for pipe, name, echo_to in ((proc.stdout, "stdout", out), (proc.stderr, "stderr", err)):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.streams[fd] = (_Stream(name), pipe, echo_to)
            self.sel.register(fd, selectors.EVENT_READ)
        self.progress = progress_line
        self.out, self.err = out, err
        self.mid_line = False  # the last echoed piece did not end a line
        self.feed_error_reported = False
        self.log_error_reported = False
        self.fatal = None  # first gpu_oom/host_oom Finding
        self.fatal_at: Optional[float] = None
        self.classify = True  # stop acting on findings once the attempt is being ended
        self.pass_stream = _accepts_stream(classifier)

    def pipe_inodes(self) -> set[int]:
        """Inodes of the output pipes that are still open."""
        out = set()
        for fd in self.sel.get_map():
            try:
                out.add(os.fstat(fd).st_ino)
            except OSError:
                pass
        return out

    @property
    def open_streams(self) -> bool:
        return bool(self.sel.get_map())

    def pump(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` for output and handle all that is there.  Returns
        True when any bytes arrived."""
        if not self.open_streams:
            if timeout:
                time.sleep(timeout)
            return False
        got = False
        for key, _ in self.sel.select(timeout):
            fd = key.fd
            stream, pipe, echo_to = self.streams[fd]
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                got = True
                self._handle(stream, echo_to, stream.split(data))
            else:
                self._handle(stream, echo_to, stream.split(b"", final=True), final=True)
                self.sel.unregister(fd)
        return got

    def _handle(self, stream: _Stream, echo_to: _Echo, pieces: list, final: bool = False) -> None:
        if not pieces and not final:
            return
        raw = b"".join(c + t for c, t, _ in pieces)
        if raw:
            self._log(raw)
        texts = []
        for i, (content, term, is_line) in enumerate(pieces):
            last = final and i == len(pieces) - 1
            text = stream.decode(content + term, final=last)
            texts.append(text)
            if not is_line:
                continue
            line = text[:-len(term)] if term else text
            self._feed(line, stream.name)
        if final and not pieces:
            tail = stream.decode(b"", final=True)
            if tail:
                texts.append(tail)
                self._feed(tail, stream.name)
        text = "".join(texts)
        if text and echo_to.enabled:
            self.progress.clear()
            echo_to.write(text)
            echo_to.flush()
            self.mid_line = not text.endswith(("\n", "\r"))

    def _log(self, raw: bytes) -> None:
        try:
            view = memoryview(raw)
            while view:
                n = os.write(self.log_fd, view)
                view = view[n:]
        except OSError as e:
            if not self.log_error_reported:
                self.log_error_reported = True
                self.err.write(f"\n[dsplan] cannot write the attempt log: {e}\n")

    def _feed(self, line: str, stream_name: str) -> None:
        try:
            if self.pass_stream:
                finding = self.classifier.feed(line, stream=stream_name)
            else:
                finding = self.classifier.feed(line)
        except Exception as e:  # a classifier bug must not leave the training unsupervised
            if not self.feed_error_reported:
                self.feed_error_reported = True
                self.err.write(f"\n[dsplan] log classifier failed on a line ({type(e).__name__}: {e}); "
                               "continuing without it for that line\n")
            return
        if finding is not None and self.classify and self.fatal is None \
                and getattr(finding, "verdict", None) in _FATAL:
            self.fatal = finding
            self.fatal_at = time.time()

    def drain(self, seconds: float) -> None:
        """Read until every pipe is closed, for at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while self.open_streams:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.pump(min(left, 0.1))

    def close(self) -> None:
        for fd, (stream, pipe, echo_to) in list(self.streams.items()):
            if stream.buf or stream.decoder.getstate()[0]:
                if fd in self.sel.get_map():
                    self._handle(stream, echo_to, stream.split(b"", final=True), final=True)
            try:
                pipe.close()
            except OSError:
                pass
        self.sel.close()


def run_attempt(argv: list[str], env: dict[str, str], cwd: Path, log_path: Path, trainer_log: Optional[Path],
                classifier, *, stall_timeout: Optional[float] = 1800, grace: float = 3.0, echo: bool = True,
                progress: bool = True, stop_event: Optional[threading.Event] = None,
                progress_interval: float = 30.0, poll_interval: float = 0.1) -> AttemptOutcome:
    """Run ``argv`` once and return how it ended.

    ``argv`` is a list (never a shell string).  The child gets its own session, no
    stdin, and the given ``env``/``cwd``.  Its stdout and stderr are appended, as the
    raw bytes, to ``log_path`` (one whole line at a time per stream), echoed to
    dsplan's own stdout/stderr when ``echo``, and fed line by line to
    ``classifier.feed``.

    ``trainer_log`` is the attempt's ``<output_dir>/trainer_log.jsonl`` (it need
    not exist yet): it drives the progress line and counts as activity for the
    stall watchdog.  ``stall_timeout=None`` turns the watchdog off.

    Setting ``stop_event`` (from any thread or a signal handler) ends the attempt
    with verdict ``interrupted`` within about ``poll_interval`` seconds plus the
    teardown.  If an exception (KeyboardInterrupt included) escapes while the
    attempt runs, its processes are killed before it propagates.

    Raises OSError if the program cannot be started."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of arguments, not a string")
    argv = [os.fspath(a) for a in argv]
    verdicts = importlib.import_module("dsplan.logs.classifier")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = _Echo(sys.stdout, echo)
    err = _Echo(sys.stderr, echo)
    progress_line = _ProgressLine(_Echo(sys.stderr, True), progress and trainer_log is not None, progress_interval)
    watcher = ProgressWatcher(trainer_log) if trainer_log is not None else None

    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    started = now_iso()
    try:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except BaseException:
        os.close(log_fd)
        raise

    att: Optional[_Attempt] = None
    tree: Optional[ProcessTree] = None
    reason: Optional[str] = None
    decided_at: Optional[float] = None
    survivors: list[int] = []
    finished = False
    try:
        tree = ProcessTree(proc.pid)
        att = _Attempt(proc, log_fd, classifier, progress_line, out, err)
        now = time.monotonic()
        last_activity = now
        next_watch = now
        next_refresh = now + _REFRESH_EVERY
        exited_at: Optional[float] = None
        watch_every = 1.0 if stall_timeout is None else max(0.05, min(1.0, stall_timeout / 4))
        while True:
            if stop_event is not None and stop_event.is_set():
                reason = "interrupted"
                break
            if att.pump(poll_interval):
                last_activity = time.monotonic()
            if att.fatal is not None:
                reason = "oom"
                decided_at = att.fatal_at
                break
            now = time.monotonic()
            if watcher is not None and now >= next_watch:
                next_watch = now + watch_every
                if watcher.poll():
                    last_activity = now
                    progress_line.set(format_progress(watcher.state))
            if not att.mid_line:
                progress_line.redraw()
            progress_line.tick()
            if exited_at is None and _exited(proc):
                exited_at = now
            if exited_at is not None:
                if not att.open_streams:
                    break
                if now - exited_at >= _DRAIN_AFTER_EXIT:
                    reason = "leftovers"
                    break
            if stall_timeout is not None and now - last_activity >= stall_timeout:
                reason = "stalled"
                break
            if now >= next_refresh:  # learn new ranks/workers while their parents are alive
                next_refresh = now + _REFRESH_EVERY
                tree.refresh()

        if reason is not None:
            att.classify = False
            if decided_at is None:
                decided_at = time.time()
            survivors = tree.kill(grace, pump=att.pump)
        elif _leftovers(tree):  # the child exited by itself but left something running
            survivors = tree.kill(min(grace, 1.0), pump=att.pump)
        att.drain(0.2)
        if att.open_streams:
            # Still no end-of-file although every known process is gone: a process
            # dsplan never saw (say a rank whose torchrun died before dsplan looked)
            # holds the output pipes.
            holders = _pipe_holders(att.pipe_inodes())
            if holders:
                tree.adopt(holders)
                survivors = tree.kill(grace, pump=att.pump)
            att.drain(_DRAIN_AFTER_KILL)
        try:
            exit_code: Optional[int] = proc.wait(timeout=_KILL_WAIT)
        except subprocess.TimeoutExpired:  # stuck in the kernel even after SIGKILL (a hung GPU driver)
            exit_code = None
        finished = True
    finally:
        if not finished:  # an exception (Ctrl-C without a handler, a bug): take the attempt down first
            if tree is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            else:
                try:
                    tree.kill(grace)
                except BaseException:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
            try:
                proc.wait(timeout=_KILL_WAIT)
            except Exception:
                pass
        progress_line.clear()
        try:
            if att is not None:
                att.close()
            else:
                for pipe in (proc.stdout, proc.stderr):
                    pipe.close()
        finally:
            os.close(log_fd)
    cleared_at = time.time()
    if watcher is not None:
        watcher.poll()
    ended = now_iso()

    if reason == "oom":
        finding = att.fatal
    elif reason == "stalled":
        finding = _make_finding(verdicts, verdicts.STALLED,
                                f"no output and no step for {stall_timeout:g} s", "watchdog")
    elif reason == "interrupted":
        finding = _make_finding(verdicts, verdicts.INTERRUPTED, "stop requested (signal to dsplan)", "stop")
    else:
        finding = classifier.conclude(exit_code)
    if survivors:
        err.write(f"[dsplan] warning: processes {', '.join(map(str, survivors))} survived SIGKILL "
                  "(stuck in the kernel or a driver?)\n")
        err.flush()
    return AttemptOutcome(
        exit_code=exit_code, finding=finding, started=started, ended=ended,
        killed=reason is not None and reason != "leftovers", kill_reason=reason, pid=proc.pid,
        findings=list(getattr(classifier, "findings", []) or []),
        last_step=watcher.last_step if watcher is not None else None,
        decided_at=decided_at, cleared_at=cleared_at, survivors=survivors,
    )


def _leftovers(tree: ProcessTree) -> bool:
    """Anything still running besides the (exited, unreaped) child itself?"""
    tree.refresh()
    return any(p.pid != tree.root for p in tree.alive())
