"""Find every process of one training attempt, and take them all down.

"Every process" takes some care.  torchrun starts each rank with
``start_new_session=True``, so the ranks are not in the child's process group,
and a group kill of the child alone would leave them all running.
:class:`ProcessTree` therefore keeps a list of the child's descendants (the
supervisor refreshes it now and then, and it is taken once more just before
signalling), signals every process group among them -- the child's, each
rank's with its data-loader workers, any helper's that moved to a group of its
own -- and :func:`pipe_holders` finds whoever still holds the output pipes open
when nothing known is left.

POSIX only (sessions, process groups, ``killpg``); the /proc lookups are Linux
and fall back to slower per-process questions elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable, Iterator, Optional

import psutil

from dsplan.launch.guard import live_processes

#: How long SIGKILL is given to take effect before dsplan gives up on a process
#: (one stuck in uninterruptible sleep inside a driver, for instance).
KILL_WAIT = 10.0


def _proc_scan(ids: set[int]) -> Optional[list[int]]:
    """Pids of live (non-zombie) processes whose process group or session id is in
    ``ids``, read from /proc in one pass; None where there is no /proc."""
    procs = live_processes()
    if procs is None:
        return None
    return [pid for pid, _, pgrp, sid in procs if pgrp in ids or sid in ids]


def members(ids: set[int]) -> list[int]:
    """Pids of the processes in any of the given process groups or sessions."""
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


def pipe_holders(inodes: set[int]) -> list[int]:
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


def still_running(procs) -> list[int]:
    """The pids of the :class:`psutil.Process` handles still running; a handle never mistakes a
    reused pid for the process it was taken of."""
    return [p.pid for p in procs if not _gone(p)]


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


def exited(proc: subprocess.Popen) -> bool:
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


def kill_group(pgid: int) -> None:
    """SIGKILL one process group, ignoring one that is already gone: the last resort."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _naps(seconds: float) -> Iterator[None]:
    """Yield, then sleep a little longer each time (2 ms up to 50 ms), until
    ``seconds`` have passed; the caller checks its condition at each yield."""
    deadline = time.monotonic() + max(0.0, seconds)
    nap = 0.002
    while True:
        yield
        if time.monotonic() >= deadline:
            return
        time.sleep(nap)
        nap = min(nap * 2, 0.05)


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
        for pid in members(self._ids(self.alive())):
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

    def has_leftovers(self) -> bool:
        """Anything still running besides the (exited, unreaped) child itself?"""
        self.refresh()
        return any(p.pid != self.root for p in self.alive())

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

    def kill(self, grace: float, pump: Optional[Callable[[], object]] = None) -> list[int]:
        """SIGTERM everything at once; SIGKILL whatever is left after ``grace``
        seconds.  ``pump`` is called while waiting (to keep reading the pipes, so a
        dying process never blocks on a full pipe).  Returns the pids that were still
        there after SIGKILL had :data:`KILL_WAIT` seconds (normally none)."""
        self.refresh()  # snapshot before signalling: orphans still have their parent now
        self.signal(signal.SIGTERM)
        if self._wait_gone(grace, pump):
            return []
        return self._force(pump)

    def _wait_gone(self, seconds: float, pump: Optional[Callable[[], object]]) -> bool:
        """Keep pumping and looking for up to ``seconds``; True once nothing is left."""
        for _ in _naps(seconds):
            if pump:
                pump()
            self.refresh()
            if not self.alive():
                return True
        return False

    def _force(self, pump: Optional[Callable[[], object]]) -> list[int]:
        """SIGKILL, again and again (to catch late arrivals), for up to :data:`KILL_WAIT`;
        returns the pids still there at the end."""
        left: list[psutil.Process] = []
        for _ in _naps(KILL_WAIT):
            self.refresh()
            self.signal(signal.SIGKILL)
            if pump:
                pump()
            left = self.alive()
            if not left:
                return []
        return [p.pid for p in left]
