"""Training progress: read from LLaMA-Factory's ``trainer_log.jsonl``, shown as one line.

LLaMA-Factory's ``LogCallback`` appends one JSON object per logging step to
``<output_dir>/trainer_log.jsonl`` (rank 0 only, from a background thread).
Each object carries ``current_steps``, ``total_steps``, ``loss``, ``lr``,
``epoch``, ``percentage`` and the ``elapsed_time`` / ``remaining_time``
strings (``H:MM:SS``); keys whose value is ``None`` are left out.

:class:`ProgressWatcher` tails that file cheaply: it keeps a byte offset, only
reads what was appended since the last poll, keeps an unfinished last line for
the next poll, and starts over when the file is truncated or replaced (LF
deletes an old log when ``overwrite_output_dir`` is set).  The launcher uses
:meth:`ProgressWatcher.poll` both to draw a progress line and, through its
return value, as a sign of life for the stall watchdog.

:func:`format_progress` turns the latest record into a short text, and
:class:`ProgressLine` shows it: redrawn in place on a terminal, as an
occasional plain line otherwise.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dsplan.fsutil import json_objects

TRAINER_LOG = "trainer_log.jsonl"

#: On first open of a big log, only its tail is parsed: the latest state is all we need.
_TAIL_ON_OPEN = 64 * 1024
#: An unfinished line longer than this is not a trainer log line; drop it.
_MAX_PENDING = 1024 * 1024


@dataclass
class ProgressState:
    """The latest trainer-log record, with the fields the progress line uses."""

    current_steps: Optional[int] = None
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    epoch: Optional[float] = None
    percentage: Optional[float] = None
    elapsed_time: Optional[str] = None
    remaining_time: Optional[str] = None
    records: int = 0  # records parsed since the watcher (re)started reading the file
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, rec: dict[str, Any], records: int) -> "ProgressState":
        return cls(
            current_steps=_as_int(rec.get("current_steps")),
            total_steps=_as_int(rec.get("total_steps")),
            loss=_as_float(rec.get("loss")),
            lr=_as_float(rec.get("lr")),
            epoch=_as_float(rec.get("epoch")),
            percentage=_as_float(rec.get("percentage")),
            elapsed_time=_as_str(rec.get("elapsed_time")),
            remaining_time=_as_str(rec.get("remaining_time")),
            records=records,
            raw=dict(rec),
        )


def _as_int(v: Any) -> Optional[int]:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return int(v)
    return None


def _as_float(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def _as_str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) and v else None


class ProgressWatcher:
    """Polls a ``trainer_log.jsonl`` that may not exist yet, may end in half a line,
    and may be truncated or replaced while watched.  Not thread-safe; poll it from
    one thread."""

    def __init__(self, path: Path | str | None):
        self.path = Path(path) if path is not None else None
        self.state: Optional[ProgressState] = None
        self._offset = 0
        self._ident: Optional[tuple[int, int]] = None  # (st_dev, st_ino) of the file being read
        self._pending = b""
        self._skip_partial = False  # started mid-file: the first fragment is not a whole line
        self._records = 0

    @property
    def last_step(self) -> Optional[int]:
        """``current_steps`` of the newest record, or None before the first one."""
        return self.state.current_steps if self.state else None

    def _restart(self) -> None:
        self._offset = 0
        self._pending = b""
        self._skip_partial = False
        self._records = 0
        self.state = None

    def poll(self) -> bool:
        """Read whatever was appended since the last call.  Returns True when the file
        changed in any way (new bytes, truncation, replacement): the watchdog counts
        that as activity even before a whole new record is complete."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            if self._ident is not None:  # file went away: start over when it comes back
                self._ident = None
                self._restart()
                return True
            return False
        ident = (st.st_dev, st.st_ino)
        changed = False
        if ident != self._ident or st.st_size < self._offset:
            first_open = self._ident is None and self.state is None
            self._ident = ident
            self._restart()
            changed = not first_open or st.st_size > 0
            if first_open and st.st_size > _TAIL_ON_OPEN:
                self._offset = st.st_size - _TAIL_ON_OPEN
                self._skip_partial = True
        if st.st_size == self._offset:
            return changed
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(st.st_size - self._offset)
        except OSError:
            return changed
        if not data:
            return changed
        self._offset += len(data)
        self._consume(data)
        return True

    def _consume(self, data: bytes) -> None:
        buf = self._pending + data
        lines = buf.split(b"\n")
        self._pending = lines.pop()  # b"" when data ended with a newline
        if len(self._pending) > _MAX_PENDING:
            self._pending = b""
            self._skip_partial = True
        if self._skip_partial and lines:
            lines.pop(0)
            self._skip_partial = False
        latest = None
        for rec in json_objects(lines):
            self._records += 1
            latest = rec
        if latest is not None:
            self.state = ProgressState.from_record(latest, self._records)


def format_progress(state: Optional[ProgressState]) -> str:
    """One short line, e.g. ``step 12/40 (30%) loss 1.234 ETA 0:01:10``; fields
    missing from the record are left out."""
    if state is None:
        return "waiting for the first training step"
    parts = []
    if state.current_steps is not None:
        step = f"step {state.current_steps}"
        if state.total_steps:
            step += f"/{state.total_steps}"
        parts.append(step)
    pct = state.percentage
    if pct is None and state.current_steps is not None and state.total_steps:
        pct = 100.0 * state.current_steps / state.total_steps
    if pct is not None:
        parts.append(f"({pct:.0f}%)")
    if state.loss is not None:
        parts.append(f"loss {state.loss:.4g}")
    if state.remaining_time:
        parts.append(f"ETA {state.remaining_time}")
    return " ".join(parts) if parts else "training"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class ProgressLine:
    """On a terminal: one line redrawn in place, cleared before child output is
    echoed.  Otherwise: a plain line every ``interval`` seconds when it changed.

    ``out`` is a :class:`dsplan.launch.streams.Echo` (anything with ``stream``,
    ``enabled``, ``write`` and ``flush``)."""

    def __init__(self, out, enabled: bool, interval: float):
        self.out = out
        self.enabled = enabled and out.enabled
        self.tty = self.enabled and _isatty(out.stream)
        self.interval = interval
        self.text: Optional[str] = None
        self.shown = False
        self.last_plain_text: Optional[str] = None
        self.last_plain_at = time.monotonic()

    def set(self, text: str) -> None:
        """Show this text from now on."""
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
        """Off a terminal: print the text if it changed and ``interval`` has passed."""
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
        """On a terminal: wipe the line so child output starts on a clean one."""
        if self.tty and self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False

    def redraw(self) -> None:
        """On a terminal: draw the line again after :meth:`clear`."""
        if self.tty and self.text is not None and not self.shown:
            self._draw()
