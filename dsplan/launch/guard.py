"""Stand between dsplan and the training command, and end the command's whole tree if dsplan dies.

dsplan does not start ``llamafactory-cli train`` itself: it starts this file as a
small guardian process (:func:`start_guarded`), which starts the command and
waits for it.  Why a process in between:

* ``prctl(PR_SET_PDEATHSIG)`` only reaches the *direct* child of the process
  that died, and torchrun's ranks are great-grandchildren of dsplan, each in a
  session of its own.  The guardian asks for a signal when dsplan dies
  (``SIGUSR1``, acted on only when ``getppid()`` shows dsplan really gone; the
  same check closes the race with a dsplan that dies before the request is
  made) and then ends every process below it: SIGTERM, then SIGKILL after a
  short grace.
* It is a child *subreaper* (``PR_SET_CHILD_SUBREAPER``): a process whose parent
  dies (a rank whose torchrun crashed, a worker that double-forked into a new
  session) is re-parented to the guardian rather than to init, so the tree under
  the guardian is always the whole attempt.
* It sets ``PR_SET_PDEATHSIG=SIGKILL`` on the command itself, so a guardian that
  is killed outright still takes its direct child along.

Otherwise it is transparent: it ignores SIGINT, SIGTERM, SIGHUP and SIGQUIT (a
signal meant for the attempt reaches the command through its process group),
and exits as the command did -- the same exit code, or killed by the same
signal.  It reports on a status pipe whether the command could be executed
("ok PID" or "err ERRNO"), so an ``OSError`` from ``exec`` still reaches dsplan.

The guardian part runs as ``python -I -S guard.py PARENT STATUS_FD GRACE -- CMD...``
and uses the standard library only.  Without ``prctl`` (not Linux) it polls
``getppid()`` instead and cannot adopt orphans.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: The signal the kernel sends the guardian when dsplan's thread that started it ends.
PARENT_DIED = signal.SIGUSR1
#: Signals the guardian lets pass to its command (through the process group) and outlives.
_PASSED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: Signals reset to their defaults in the command (Python ignores the last two).
_RESET = (*_PASSED, PARENT_DIED, signal.SIGPIPE, signal.SIGXFSZ)
#: How long dsplan waits for the guardian to say whether the command started.
STATUS_TIMEOUT = 60.0
#: After dsplan died: how long SIGKILL is repeated before the guardian gives up.
_KILL_FOR = 10.0


class _ParentGone(Exception):
    """Raised from the PARENT_DIED handler to break out of ``waitpid``."""


# ---------------------------------------------------------------- dsplan's side


def start_guarded(argv: list[str], env: dict[str, str], cwd, *, grace: float) -> tuple[subprocess.Popen, int]:
    """Start ``argv`` under a guardian in a session of its own, stdout and stderr piped.
    Returns the guardian's Popen (its pid leads the session and process group) and the
    command's pid.  Raises ``OSError`` (with the command as ``filename``) when the
    command cannot be executed."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), str(w), f"{grace:g}", "--",
             *argv],
            env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, pass_fds=(w,))
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        status = _read_status(r)
    finally:
        os.close(r)
    if status.startswith("ok "):
        return proc, int(status.split()[1])
    _discard(proc)
    if status.startswith("err "):
        code = int(status.split()[1])
        raise OSError(code, os.strerror(code), argv[0])
    raise OSError(errno.ECHILD, f"dsplan's launch guardian ended before starting the command ({status or 'no word'})",
                  argv[0])


def _read_status(fd: int) -> str:
    """The guardian's one status line, or "" if it closed the pipe without one or took too long."""
    data = b""
    deadline = time.monotonic() + STATUS_TIMEOUT
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "timeout"
        chunk = os.read(fd, 256)
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", "replace").strip()


def _discard(proc: subprocess.Popen) -> None:
    """Take down a guardian whose command did not start, and close its pipes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


# ---------------------------------------------------------------- the guardian


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _exec_child(cmd: list[str], status_fd: int, err_w: int) -> None:
    """In the forked child: defaults for every signal, die with the guardian, exec the command.
    Never returns; an exec failure is written to ``err_w`` as its errno."""
    try:
        for sig in _RESET:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.close(status_fd)
        os.execvp(cmd[0], cmd)
    except OSError as e:
        os.write(err_w, str(e.errno or errno.ENOEXEC).encode())
    except BaseException:
        os.write(err_w, str(errno.ENOEXEC).encode())
    os._exit(127)


def _spawn(cmd: list[str], status_fd: int) -> int | None:
    """Fork and exec the command; report "ok PID" or "err ERRNO" on the status pipe."""
    err_r, err_w = os.pipe()  # close-on-exec: end of file here means the exec worked
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _exec_child(cmd, status_fd, err_w)
    os.close(err_w)
    failure = b""
    while True:
        chunk = os.read(err_r, 64)
        if not chunk:
            break
        failure += chunk
    os.close(err_r)
    if failure:
        os.waitpid(pid, 0)
        os.write(status_fd, b"err " + failure + b"\n")
    else:
        os.write(status_fd, f"ok {pid}\n".encode())
    os.close(status_fd)
    return None if failure else pid


def live_processes() -> list[tuple[int, int, int, int]] | None:
    """(pid, ppid, process group, session) of every live (non-zombie) process, read from /proc in
    one pass; None where there is no /proc.  Standard library only: the guardian runs without site."""
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
            fields = data[data.rfind(b")") + 2:].split()  # state ppid pgrp session ...
            if len(fields) >= 4 and fields[0] not in (b"Z", b"X", b"x"):
                out.append((int(name), int(fields[1]), int(fields[2]), int(fields[3])))
        except (OSError, ValueError):
            continue
    return out


def _descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below ``root``, read from /proc."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in live_processes() or ():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            out.append(pid)
            todo.append(pid)
    return out


def _reap() -> None:
    """Collect every child that has ended (orphans re-parented here included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _end_tree(grace: float) -> None:
    """dsplan is gone: SIGTERM everything below, SIGKILL what is left after ``grace``."""
    signal.signal(PARENT_DIED, signal.SIG_IGN)
    if not os.path.isdir("/proc"):  # no way to list the tree: take the process group down
        os.killpg(0, signal.SIGTERM)  # the guardian itself outlives it (its handler does nothing)
        time.sleep(grace)
        os.killpg(0, signal.SIGKILL)  # and this ends the guardian too
        return
    start = time.monotonic()
    term_sent = False
    while time.monotonic() - start < grace + _KILL_FOR:
        _reap()
        pids = _descendants(os.getpid())
        if not pids:
            return
        sig = signal.SIGTERM if time.monotonic() - start < grace else signal.SIGKILL
        if sig == signal.SIGKILL or not term_sent:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            term_sent = True
        time.sleep(0.02)


def _wait(child: int, parent: int, have_pdeathsig: bool) -> int:
    """The command's wait status; raises :class:`_ParentGone` if dsplan dies first."""
    while True:
        if os.getppid() != parent:
            raise _ParentGone
        try:
            pid, status = os.waitpid(-1, 0 if have_pdeathsig else os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == child:
            return status
        if pid == 0:
            time.sleep(0.2)


def _exit_like(status: int) -> None:
    """Exit as the command did: the same code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ImportError, ValueError, OSError):
            pass
        try:
            signal.signal(sig, signal.SIG_DFL)  # SIGKILL and SIGSTOP cannot be caught: nothing to reset
        except (OSError, ValueError):
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        time.sleep(1.0)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


#: dsplan's pid, as the guardian was told it.
_parent = 0


def _on_parent_died(signum, frame) -> None:
    """PARENT_DIED arrived.  It counts only if dsplan is really gone: the kernel also sends
    it when just the thread that started the guardian ends (the guardian is then handed to
    another thread of dsplan, and its parent pid stays the same), and SIGUSR1 may come
    from elsewhere (a batch system's warning signal, say)."""
    if os.getppid() != _parent:
        raise _ParentGone


def guardian_main(args: list[str]) -> None:
    global _parent
    parent, status_fd, grace = int(args[0]), int(args[1]), float(args[2])
    _parent = parent
    cmd = args[4:]
    os.set_inheritable(status_fd, False)
    for sig in _PASSED:
        signal.signal(sig, lambda signum, frame: None)
    signal.signal(PARENT_DIED, _on_parent_died)
    have_pdeathsig = _prctl(PR_SET_PDEATHSIG, PARENT_DIED)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        if os.getppid() != parent:  # dsplan died before it could be watched: start nothing
            os._exit(1)
        child = _spawn(cmd, status_fd)
        if child is None:
            os._exit(127)
        status = _wait(child, parent, have_pdeathsig)
    except _ParentGone:
        _end_tree(grace)
        os._exit(1)
    _exit_like(status)


if __name__ == "__main__":
    try:
        guardian_main(sys.argv[1:])
    except Exception as exc:  # one line, not a traceback the log classifier would have to read
        os.write(2, f"[dsplan guardian] internal error: {type(exc).__name__}: {exc}\n".encode(errors="replace"))
        os._exit(70)
