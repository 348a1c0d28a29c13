"""Carry a training command's output from its pipes to the log, the terminal and the classifier.

:class:`OutputReader` waits on the child's stdout and stderr pipes, reads
whatever bytes are there, appends them unchanged to the attempt log
(:class:`AttemptLog`), echoes them to dsplan's own stdout/stderr
(:class:`QueuedEcho`, or :class:`Echo` for an in-memory stream), and hands
every complete line, decoded, to a callback -- the supervisor's, which feeds
the classifier.  :class:`LineSplitter` turns one pipe's bytes into those lines.

Writing never waits: the log and each terminal descriptor have a
:class:`BackgroundWriter`, a thread fed through a bounded queue.  A terminal
that stops reading (a paused ``| less``, Ctrl-S) or a disk that stalls loses
the output that does not fit, counted and marked where it is missing; a disk
that fills up stops the log, never the reading.

Nothing here decides anything about the attempt; it only moves text."""

from __future__ import annotations

import codecs
import os
import re
import select
import selectors
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Optional

#: Longest piece of a line handed to the classifier; longer lines are cut into pieces.
MAX_LINE = 64 * 1024
_READ_CHUNK = 64 * 1024
#: Most bytes waiting for a terminal or pipe that is not reading before more are dropped.
ECHO_QUEUE_BYTES = 1024 * 1024
#: Most bytes waiting for the disk before more are dropped (a stalled network file system).
LOG_QUEUE_BYTES = 16 * 1024 * 1024
_TERM_RE = re.compile(rb"\r\n|\r|\n")

#: (content, terminator, is_line): one piece of output as :meth:`LineSplitter.split` returns it.
Piece = tuple[bytes, bytes, bool]


class LineSplitter:
    """Splits one pipe's bytes into lines on ``\\n``, ``\\r`` and ``\\r\\n``, cutting
    lines longer than :data:`MAX_LINE`, and decodes them as UTF-8 (bad bytes become
    U+FFFD; a character split across reads is decoded whole)."""

    def __init__(self, name: str):
        self.name = name
        self.buf = bytearray()
        self.after_cr = False  # the last piece ended in "\r" that may be half of "\r\n"
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def split(self, data: bytes, final: bool = False) -> list[Piece]:
        """(content, terminator, is_line) pieces; is_line is False for the lone
        "\\n" that completes a "\\r\\n" split across two reads."""
        pieces: list[Piece] = []
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

    @property
    def holds_partial(self) -> bool:
        """Are there bytes not yet handed out (an unfinished line or half a character)?"""
        return bool(self.buf or self.decoder.getstate()[0])


class Echo:
    """Writes child lines to a text stream, at once and in the caller's thread; never
    raises (a closed terminal or broken pipe just turns echoing off).  For streams
    that cannot block (an in-memory buffer); a terminal or pipe gets :class:`QueuedEcho`."""

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

    def drain(self, timeout: float) -> bool:
        return True

    @property
    def dropped(self) -> int:
        return 0


class BackgroundWriter:
    """Hands bytes to ``sink`` from a thread of its own, through a queue of at most
    ``limit`` bytes.  :meth:`put` never blocks: when the queue is full the bytes are
    dropped and counted, and ``note(n)`` (if given) goes into the stream where they
    were missing.  The first ``OSError``/``ValueError`` from the sink stops the
    writer for good (``error`` says why); later bytes are discarded, not counted."""

    def __init__(self, sink: Callable[[bytes], None], limit: int, name: str,
                 note: Optional[Callable[[int], bytes]] = None):
        self._sink = sink
        self._limit = limit
        self._note = note
        self._chunks: deque[bytes] = deque()
        self._queued = 0  # bytes waiting or being written
        self._gap = 0  # bytes dropped since the last ones that got in
        self._cond = threading.Condition()
        self._closing = False
        self.dropped = 0
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _mark_gap(self) -> None:
        """Queue the note about the bytes dropped just before this point (lock held)."""
        if self._gap and self._note is not None:
            note = self._note(self._gap)
            self._chunks.append(note)
            self._queued += len(note)
        self._gap = 0

    def put(self, data: bytes) -> bool:
        """Queue ``data``; False when it was dropped (queue full) or discarded (writer stopped)."""
        if not data:
            return True
        with self._cond:
            if self.error is not None or self._closing:
                return False
            if self._queued + len(data) > self._limit:
                self.dropped += len(data)
                self._gap += len(data)
                return False
            self._mark_gap()
            self._chunks.append(data)
            self._queued += len(data)
            self._cond.notify_all()
        return True

    def _take(self) -> Optional[bytes]:
        """Wait for bytes to write; None once closing and nothing is left.  The bytes stay
        counted in ``_queued`` until :meth:`_run` has written them."""
        with self._cond:
            while not self._chunks:
                if self._closing:
                    return None
                self._cond.wait()
            data = b"".join(self._chunks)
            self._chunks.clear()
            return data

    def _run(self) -> None:
        while True:
            data = self._take()
            if data is None:
                return
            try:
                self._sink(data)
            except (OSError, ValueError) as e:
                with self._cond:
                    self.error = e
                    self._chunks.clear()
                    self._queued = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._queued -= len(data)
                self._cond.notify_all()

    def note_gap(self) -> None:
        """Queue the note about bytes dropped since the last ones that got in, now."""
        with self._cond:
            if self.error is None and not self._closing:
                self._mark_gap()
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for everything queued to be written; True if it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float) -> bool:
        """Write what is queued, and the note about a last gap, for at most ``timeout``
        seconds, then stop the thread.  True when all of it was written."""
        with self._cond:
            if self.error is None:
                self._mark_gap()
                self._cond.notify_all()
        done = self.drain(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if done:
            self._thread.join(1.0)
        return done and not self._thread.is_alive()


def _fd_sink(fd: int) -> Callable[[bytes], None]:
    """Write all of the bytes to ``fd``, waiting out a non-blocking descriptor."""
    def sink(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                select.select([], [fd], [], 1.0)
                continue
            view = view[n:]
    return sink


def _stream_fd(stream) -> Optional[int]:
    """The file descriptor behind a text stream, or None (an in-memory buffer)."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


#: One writer per terminal/pipe descriptor for the life of the process, so that a writer
#: stuck on a stalled terminal is never joined by a second one for the next attempt.
_FD_WRITERS: dict[int, BackgroundWriter] = {}
_FD_WRITERS_LOCK = threading.Lock()


def _terminal_note(n: int) -> bytes:
    return (f"\n[dsplan] {n} bytes of output not shown here: this terminal or pipe was not reading "
            "(the attempt log has them)\n").encode()


def fd_writer(fd: int) -> BackgroundWriter:
    """The process-wide background writer for descriptor ``fd``."""
    with _FD_WRITERS_LOCK:
        w = _FD_WRITERS.get(fd)
        if w is None or w.error is not None:
            w = _FD_WRITERS[fd] = BackgroundWriter(_fd_sink(fd), ECHO_QUEUE_BYTES, f"dsplan-echo-{fd}",
                                                   _terminal_note)
        return w


class QueuedEcho:
    """:class:`Echo` for a stream that can block (a terminal, a pipe): text goes to the
    descriptor through :func:`fd_writer`'s bounded queue, so a terminal that stops
    reading (a paused ``| less``, Ctrl-S) never stops the supervisor; what does not
    fit is dropped and counted.  Same methods as :class:`Echo`."""

    def __init__(self, stream, enabled: bool, writer: BackgroundWriter):
        self.stream = stream
        self.enabled = enabled
        self.writer = writer
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self._dropped_at_start = writer.dropped

    def write(self, text: str) -> None:
        if not self.enabled or not text:
            return
        self.writer.put(text.encode(self.encoding, "replace"))
        if self.writer.error is not None:
            self.enabled = False

    def flush(self) -> None:
        """Nothing to do: the writer thread writes as soon as it can."""

    def drain(self, timeout: float) -> bool:
        """Tell about a gap left by dropped output, and wait up to ``timeout`` for the rest to go out."""
        self.writer.note_gap()
        return self.writer.drain(timeout)

    @property
    def dropped(self) -> int:
        """Bytes dropped since this echo was made."""
        return self.writer.dropped - self._dropped_at_start


def echo_for(stream, enabled: bool):
    """The echo for ``stream``: queued when it has a descriptor (it may block), else
    plain.  Python's own buffer for it is flushed first, so earlier text comes first."""
    if stream is None:
        return Echo(None, False)
    fd = _stream_fd(stream)
    if fd is None:
        return Echo(stream, enabled)
    try:
        stream.flush()
    except (OSError, ValueError):
        return Echo(stream, False)
    return QueuedEcho(stream, enabled, fd_writer(fd))


def _log_note(n: int) -> bytes:
    return f"\n[dsplan: {n} bytes of output dropped here: the disk did not keep up]\n".encode()


class AttemptLog:
    """The attempt log, opened for appending; raw bytes go in as they came, written by a
    thread of its own so that a slow or full disk never holds up supervision.  On the
    first failed write (a full disk, say) the log stops growing and ``error`` says
    why; the attempt goes on.  Opening the file raises ``OSError`` as usual."""

    def __init__(self, path: Path, err=None):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.writer = BackgroundWriter(_fd_sink(self.fd), LOG_QUEUE_BYTES, "dsplan-log", _log_note)
        self._reported = False

    def write(self, raw: bytes) -> None:
        self.writer.put(raw)

    @property
    def error(self) -> Optional[BaseException]:
        return self.writer.error

    @property
    def dropped(self) -> int:
        return self.writer.dropped

    def problem(self) -> Optional[str]:
        """A one-line notice the first time the log stopped growing; None otherwise."""
        e = self.writer.error
        if e is None or self._reported:
            return None
        self._reported = True
        why = getattr(e, "strerror", None) or str(e)
        return f"[dsplan] stopped writing {self.path.name}: {why}; the attempt goes on and will be recorded"

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is queued (for at most ``timeout`` seconds) and close the file.  If the
        disk is stuck the descriptor is left to the writer thread rather than closed under it."""
        done = self.writer.close(timeout)
        if done:
            os.close(self.fd)
        return done


@dataclass
class _Source:
    """One output pipe with its splitter and where its text is echoed."""

    splitter: LineSplitter
    pipe: IO[bytes]
    echo: Echo


class OutputReader:
    """Pumps the child's output pipes into the log, the echo and ``on_line``.

    ``pipes`` are (pipe, stream name, echo) triples; ``on_line(line, name)`` gets
    each decoded line without its terminator; ``before_echo`` is called before
    child text is echoed (the progress line clears itself there)."""

    def __init__(self, pipes: list[tuple[IO[bytes], str, Echo]], log: AttemptLog,
                 on_line: Callable[[str, str], None], before_echo: Callable[[], None]):
        self.log = log
        self.on_line = on_line
        self.before_echo = before_echo
        self.mid_line = False  # the last echoed piece did not end a line
        self.sel = selectors.DefaultSelector()
        self.sources: dict[int, _Source] = {}
        for pipe, name, echo in pipes:
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.sources[fd] = _Source(LineSplitter(name), pipe, echo)
            self.sel.register(fd, selectors.EVENT_READ)

    @property
    def open(self) -> bool:
        """Is any pipe still open (not yet at end of file)?"""
        return bool(self.sel.get_map())

    def pipe_inodes(self) -> set[int]:
        """Inodes of the output pipes that are still open."""
        out = set()
        for fd in self.sel.get_map():
            try:
                out.add(os.fstat(fd).st_ino)
            except OSError:
                pass
        return out

    def pump(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` for output and handle all that is there.  Returns
        True when any bytes arrived."""
        if not self.open:
            if timeout:
                time.sleep(timeout)
            return False
        got = False
        for key, _ in self.sel.select(timeout):
            got = self._read(key.fd) or got
        return got

    def _read(self, fd: int) -> bool:
        """Read once from one ready pipe; True when bytes came, False at end of file."""
        source = self.sources[fd]
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if data:
            self._handle(source, source.splitter.split(data))
            return True
        self._handle(source, source.splitter.split(b"", final=True), final=True)
        self.sel.unregister(fd)
        return False

    def _handle(self, source: _Source, pieces: list[Piece], final: bool = False) -> None:
        """Log, pass on and echo one batch of pieces from one pipe."""
        if not pieces and not final:
            return
        raw = b"".join(c + t for c, t, _ in pieces)
        if raw:
            self.log.write(raw)
        text = self._pass_lines(source.splitter, pieces, final)
        if text and source.echo.enabled:
            self.before_echo()
            source.echo.write(text)
            source.echo.flush()
            self.mid_line = not text.endswith(("\n", "\r"))

    def _pass_lines(self, splitter: LineSplitter, pieces: list[Piece], final: bool) -> str:
        """Decode the pieces, hand each whole line to ``on_line``; returns the text to echo."""
        texts = []
        for i, (content, term, is_line) in enumerate(pieces):
            last = final and i == len(pieces) - 1
            text = splitter.decode(content + term, final=last)
            texts.append(text)
            if is_line:
                self.on_line(text[:-len(term)] if term else text, splitter.name)
        if final and not pieces:
            tail = splitter.decode(b"", final=True)
            if tail:
                texts.append(tail)
                self.on_line(tail, splitter.name)
        return "".join(texts)

    def drain(self, seconds: float) -> None:
        """Read until every pipe is closed, for at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while self.open:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.pump(min(left, 0.1))

    def close(self) -> None:
        """Hand out what is left of unfinished lines, then close the pipes."""
        for fd, source in list(self.sources.items()):
            if source.splitter.holds_partial and fd in self.sel.get_map():
                self._handle(source, source.splitter.split(b"", final=True), final=True)
            try:
                source.pipe.close()
            except OSError:
                pass
        self.sel.close()
