"""Carry a training command's output from its pipes to the log, the terminal and the classifier.

:class:`OutputReader` waits on the child's stdout and stderr pipes, reads
whatever bytes are there, appends them unchanged to the attempt log
(:class:`AttemptLog`), echoes them to dsplan's own stdout/stderr
(:class:`Echo`), and hands every complete line, decoded, to a callback --
the supervisor's, which feeds the classifier.  :class:`LineSplitter` turns one
pipe's bytes into those lines.

Nothing here decides anything about the attempt; it only moves text.
"""

from __future__ import annotations

import codecs
import os
import re
import selectors
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

#: Longest piece of a line handed to the classifier; longer lines are cut into pieces.
MAX_LINE = 64 * 1024
_READ_CHUNK = 64 * 1024
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


class AttemptLog:
    """The attempt log, opened for appending; raw bytes go in as they came.  A
    failed write is reported once on ``err`` and never stops the attempt."""

    def __init__(self, path: Path, err: Echo):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.err = err
        self._error_reported = False

    def write(self, raw: bytes) -> None:
        try:
            view = memoryview(raw)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            if not self._error_reported:
                self._error_reported = True
                self.err.write(f"\n[dsplan] cannot write the attempt log: {e}\n")

    def close(self) -> None:
        os.close(self.fd)


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
