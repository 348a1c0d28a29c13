"""Claim a run folder for one ``dsplan run``: create it, check it can be written, and lock it.

:class:`RunDirLock` holds an exclusive ``fcntl.flock`` on ``<run dir>/.dsplan.lock``
for as long as the run lasts, and writes its pid there, so a second ``dsplan run``
on the same folder stops at once with one line naming the holder.  The lock goes
with the process (the kernel drops it when dsplan exits or is killed), and the
descriptor is close-on-exec, so training processes never inherit it.

Every problem here is the user's to fix by choosing another ``--run-dir`` (or
waiting): a :class:`dsplan.errors.UserError`, exit 2, before anything is written.
:func:`describe_os_error` words an ``OSError`` from later in the run as one line.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from dsplan.errors import UserError

LOCK_FILE = ".dsplan.lock"


def describe_os_error(e: OSError) -> str:
    """``<file>: <reason>`` (or just the reason) for one line."""
    why = e.strerror or str(e) or type(e).__name__
    name = e.filename if e.filename is not None else None
    return f"{name}: {why}" if name else why


def _check_writable(run_dir: Path) -> None:
    """Create and remove a file in ``run_dir``: the one test of writability that tells the
    truth for root, read-only mounts, ACLs and network file systems alike."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dsplan-probe-", dir=run_dir)
    except OSError as e:
        raise UserError(f"cannot write in --run-dir {run_dir}: {e.strerror or e}") from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass


def open_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and make sure dsplan can write in it; one-line
    :class:`UserError` otherwise."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --run-dir {run_dir}: {e.strerror or e}") from None
    if any(ch.isspace() for ch in str(run_dir.resolve())):
        raise UserError(f"--run-dir {run_dir} contains whitespace; llamafactory-cli's torchrun launcher "
                        "splits its arguments on spaces, so choose a path without any")
    _check_writable(run_dir)


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote in the file."""
    try:
        text = os.pread(fd, 200, 0).decode("ascii", "replace").split()
    except OSError:
        text = []
    return f"pid {text[0]}" if text and text[0].isdigit() else "a process that did not say its pid"


class RunDirLock:
    """An exclusive, non-blocking lock on a run folder; use as a context manager."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.warning: str | None = None  # set when the file system cannot lock

    def acquire(self) -> None:
        """Take the lock or raise :class:`UserError` naming the holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"cannot lock --run-dir {self.run_dir}: {describe_os_error(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"--run-dir {self.run_dir} is in use by another dsplan run ({holder}); wait for it "
                            "to end, or choose another --run-dir") from None
        except OSError as e:  # a file system without locks (some NFS set-ups): go on, but say so
            self.warning = (f"cannot lock --run-dir {self.run_dir} ({e.strerror or e}); nothing stops a second "
                            "dsplan run on it")
        try:  # only to name the holder; a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self.fd = fd

    def release(self) -> None:
        """Let go (the file stays: removing it would race with the next dsplan opening it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
