"""Remember an attempt's processes in the run folder, and end those a dead dsplan left running.

While an attempt runs, :class:`TreeRecord` keeps ``<run dir>/processes.json`` up
to date: dsplan's own pid, the host and boot id, and every process of the
attempt with its start time (field 22 of ``/proc/PID/stat``, clock ticks since
boot), process group, session and command line.  It is
rewritten (to a temporary file, then renamed) whenever the supervisor's list of
the attempt's processes changes, and removed when the attempt ends with nothing
left.  A record still there when dsplan starts means the last controller died
without cleaning up (``kill -9``, the OOM killer, a lost node).

:func:`cleanup_orphans` reads it and ends the processes that are still running:
a pid counts only if the host, the boot id and its start time are the recorded
ones, so a pid the kernel has since given to an unrelated process is never
touched, and a record from a live dsplan (or another host) is left alone.  The
members of a process group or session led by such a process are ended with it
(a rank's data-loader workers started after the last update).  It says what it
found, in one line or two.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import psutil

from dsplan.launch.proctree import members

RECORD_FILE = "processes.json"
#: After SIGKILL, how long an orphan is given to go (one stuck in a driver may never).
_KILL_WAIT = 10.0


def boot_id() -> Optional[str]:
    """This boot's id (Linux), so a record from before a reboot is never trusted."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> Optional[list[bytes]]:
    """Fields 3.. of /proc/PID/stat (state, ppid, pgrp, session, ...); None if it is gone or a zombie."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X", b"x"):
        return None
    return fields


def start_token(pid: int) -> Optional[str]:
    """When ``pid`` started, as a string that tells it from a later process with the same
    pid: its start time in clock ticks since boot (Linux), else psutil's create time.
    None when there is no such process (or only a zombie)."""
    try:
        fields = _stat_fields(pid)
        return None if fields is None else fields[19].decode()
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else f"ct:{p.create_time():.3f}"
    except psutil.Error:
        return None


def _describe(pid: int) -> Optional[dict]:
    """The record entry for one live process: pid, start, process group, session, command."""
    start = start_token(pid)
    if start is None:
        return None
    try:
        pgid, sid = os.getpgid(pid), os.getsid(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = ""
    return {"pid": pid, "start": start, "pgid": pgid, "sid": sid, "cmd": cmd[:200]}


def _write_json(path: Path, payload: dict) -> None:
    """Replace ``path`` whole.  No fsync: the record matters while the machine stays up."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class TreeRecord:
    """``processes.json`` for one attempt.  Writing it never raises: a failure (a full
    disk) is reported once through ``warn`` and retried at the next change."""

    def __init__(self, path: Path, attempt: Optional[int], warn: Callable[[str], None]):
        self.path = Path(path)
        self.attempt = attempt
        self.warn = warn
        self.entries: dict[int, dict] = {}
        self._written: Optional[frozenset] = None
        self._warned = False
        me = os.getpid()
        self.controller = {"pid": me, "start": start_token(me)}

    def update(self, pids: Iterable[int]) -> None:
        """Make the record list exactly these (live) processes; rewrite it if that changed."""
        pids = set(pids)
        for pid in list(self.entries):
            if pid not in pids:
                del self.entries[pid]
        for pid in pids - set(self.entries):
            entry = _describe(pid)
            if entry is not None:
                self.entries[pid] = entry
        if frozenset(self.entries) != self._written:
            self._write()

    def _write(self) -> None:
        payload = {"controller": self.controller, "host": socket.gethostname(), "boot_id": boot_id(),
                   "attempt": self.attempt,
                   "updated": time.time(), "processes": sorted(self.entries.values(), key=lambda e: e["pid"])}
        try:
            _write_json(self.path, payload)
        except OSError as e:
            if not self._warned:
                self._warned = True
                self.warn(f"[dsplan] cannot update {self.path.name} (the list of this attempt's processes): "
                          f"{e.strerror or e}")
            return
        self._written = frozenset(self.entries)

    def finish(self, survivors: list[int]) -> None:
        """The attempt is over: keep only the processes that survived SIGKILL, or remove the record."""
        if survivors:
            self.update(survivors)
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.warn(f"[dsplan] cannot remove {self.path.name}: {e.strerror or e}")


# ---------------------------------------------------------------- after a dead controller


@dataclass
class CleanupReport:
    """What :func:`cleanup_orphans` found: ``recorded`` processes in the record, ``ended``
    the orphans it ended, ``survivors`` those still there after SIGKILL."""

    found_record: bool = False
    controller: Optional[int] = None
    recorded: int = 0
    ended: list[dict] = field(default_factory=list)
    survivors: list[dict] = field(default_factory=list)
    skipped: Optional[str] = None  # why the record was left alone


def _read_record(path: Path) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read().decode("utf-8", "replace"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _entries(rec: dict) -> list[dict]:
    """The record's well-formed process entries."""
    out = []
    for e in rec.get("processes") or []:
        if isinstance(e, dict) and isinstance(e.get("pid"), int) and e["pid"] > 1 and isinstance(e.get("start"), str):
            out.append(e)
    return out


def _still_ours(entry: dict) -> bool:
    """Is this recorded process still the same process (not a reused pid)?"""
    return entry["pid"] != os.getpid() and start_token(entry["pid"]) == entry["start"]


def _group_members(leaders: set[int], known: set[int]) -> list[dict]:
    """Processes in a process group or session led by one of ``leaders`` that the record missed."""
    mine = {os.getpid(), os.getpgrp(), os.getsid(0)}
    out = []
    for pid in members(leaders - mine) if leaders - mine else []:
        if pid not in known and pid not in mine:
            entry = _describe(pid)
            if entry is not None:
                out.append(entry)
    return out


def _signal_all(entries: list[dict], sig: int) -> None:
    for e in entries:
        if _still_ours(e):
            try:
                os.kill(e["pid"], sig)
            except OSError:
                pass


def _wait_gone(entries: list[dict], seconds: float) -> list[dict]:
    deadline = time.monotonic() + seconds
    left = [e for e in entries if _still_ours(e)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [e for e in left if _still_ours(e)]
    return left


def end_processes(entries: list[dict], grace: float) -> list[dict]:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every entry still running as recorded;
    returns the ones left after SIGKILL had its time."""
    _signal_all(entries, signal.SIGTERM)
    left = _wait_gone(entries, grace)
    if not left:
        return []
    _signal_all(left, signal.SIGKILL)
    return _wait_gone(left, _KILL_WAIT)


def _show(entries: list[dict], limit: int = 6) -> str:
    shown = ", ".join(f"{e['pid']} ({(e.get('cmd') or '?')[:60]})" for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _stale(rec: dict, report: CleanupReport) -> Optional[str]:
    """Why the record must not be acted on, or None."""
    ctl = rec.get("controller") if isinstance(rec.get("controller"), dict) else {}
    cpid = ctl.get("pid")
    if rec.get("host") and rec["host"] != socket.gethostname():
        report.skipped = "other host"
        return f"it was written on host {rec['host']}; run the cleanup there"
    if rec.get("boot_id") and boot_id() and rec["boot_id"] != boot_id():
        return "it was written before this machine restarted, so none of its processes can still run"
    if isinstance(cpid, int) and cpid != os.getpid() and ctl.get("start") and start_token(cpid) == ctl["start"]:
        report.skipped = "running"
        return f"dsplan pid {cpid}, which wrote it, is still running; leaving its processes alone"
    return None


def cleanup_orphans(run_dir: Path | str, say: Callable[[str], None] = print, grace: float = 3.0,
                    prefix: str = "dsplan run") -> CleanupReport:
    """End the processes of an attempt whose dsplan died without cleaning up, as
    ``<run_dir>/processes.json`` lists them; say what was found.  Silent when there is
    no record (the last dsplan exited cleanly).  Call with the run folder locked."""
    path = Path(run_dir) / RECORD_FILE
    rec = _read_record(path)
    report = CleanupReport(found_record=rec is not None)
    if rec is None:
        return report
    ctl = rec.get("controller") if isinstance(rec.get("controller"), dict) else {}
    report.controller = ctl.get("pid") if isinstance(ctl.get("pid"), int) else None
    entries = _entries(rec)
    report.recorded = len(entries)
    who = f"dsplan pid {report.controller}" if report.controller else "an earlier dsplan"
    stale = _stale(rec, report)
    if stale is not None:
        say(f"{prefix}: {path} lists {len(entries)} processes; {stale}")
        if report.skipped is None:
            _forget(path)
        return report
    live = [e for e in entries if _still_ours(e)]
    live += _group_members({e["pid"] for e in live}, {e["pid"] for e in entries})
    if not live:
        say(f"{prefix}: {who} ended without cleaning up; found no orphans: none of the {len(entries)} processes "
            f"it recorded is still running")
        _forget(path)
        return report
    say(f"{prefix}: {who} ended without cleaning up; ending {len(live)} orphaned processes it left running: "
        f"{_show(live)}")
    report.survivors = end_processes(live, grace)
    report.ended = [e for e in live if e not in report.survivors]
    if report.survivors:
        say(f"{prefix}: {len(report.survivors)} of them survived SIGKILL (stuck in the kernel or a driver?): "
            f"{_show(report.survivors)}; {path} keeps them")
        _keep(path, rec, report.survivors)
    else:
        say(f"{prefix}: ended all {len(live)} of them")
        _forget(path)
    return report


def _forget(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _keep(path: Path, rec: dict, survivors: list[dict]) -> None:
    try:
        _write_json(path, {**rec, "processes": survivors})
    except OSError:
        pass
