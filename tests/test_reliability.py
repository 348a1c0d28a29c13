"""`dsplan run` under faults: dsplan itself killed, a full or read-only disk, a terminal that
stops reading, a damaged ledger, a second dsplan on the same folder, a signal between
attempts, a command that cannot execute.

Every training command is a fake from tests/fakes/children/.  Timeouts here only
guard against hangs; how fast things happen is measured by scripts/bench_kill.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dsplan.launch.ledger import ATTEMPTS_FILE, RESERVE_FILE, append_attempt, read_attempts
from dsplan.launch.loop import cleanup_run_dir
from dsplan.launch.orphans import RECORD_FILE, cleanup_orphans, start_token
from dsplan.launch.proctree import running, still_running
from tests.conftest import REPO, run_dsplan

CHILDREN = REPO / "tests" / "fakes" / "children"
BIG = ["--gpus", "8x80G", "--gpu-name", "A100", "--host-ram", "2048G", "--model", "Llama-3-8B", "--method", "full",
       "--cutoff-len", "1024"]
#: Only guards against a hang; the figures are in scripts/bench_kill.py.
HANG = 20.0


# --------------------------------------------------------------------------- helpers


def make_cli(tmp_path: Path, name: str, fake: str, *args: str) -> Path:
    """A llamafactory-cli stand-in: a shell script that execs one of the fakes (fake_ranks.py
    is not told `train <yaml>`: it takes no such arguments)."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    quoted = " ".join(f"'{a}'" for a in args)
    forward = "" if fake == "fake_ranks.py" else ' "$@"'
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {CHILDREN / fake} {quoted}{forward}\n")
    path.chmod(0o755)
    return path


def start_run(cli: Path, run_dir: Path, *extra: str, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "dsplan", "run", *BIG, "--lf-cli", str(cli), "--run-dir",
                             str(run_dir), *extra], stdout=stdout, stderr=stderr, cwd=REPO)


def dsplan_run(cli: Path, run_dir: Path, *extra: str, timeout: float = 120):
    return run_dsplan("run", *BIG, "--lf-cli", str(cli), "--run-dir", str(run_dir), *extra, timeout=timeout)


def read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def recorded_pids(run_dir: Path) -> set[int]:
    try:
        return {e["pid"] for e in json.loads((run_dir / RECORD_FILE).read_text())["processes"]}
    except (OSError, ValueError, KeyError):
        return set()


def processes(pids) -> list[psutil.Process]:
    """Handles on these processes that stay true to them even if a pid is reused later."""
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


still_alive = still_running  # handles, so a reused pid is not mistaken for a rank


def kill_all(pids) -> None:
    for pid in running(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def ladder() -> list[str]:
    return json.loads(run_dsplan("plan", *BIG, "--json").stdout)["ladder"]


def success_cli(tmp_path: Path) -> Path:
    return make_cli(tmp_path, "lf-ok", "fake_lf_cli.py")


def guardian_of(proc: subprocess.Popen) -> int:
    kids = psutil.Process(proc.pid).children()
    assert len(kids) == 1, kids
    return kids[0].pid


def stderr_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def no_traceback(stderr: str) -> bool:
    """No Python traceback of dsplan's own (the fakes' echoed ones start with "[rank0]: ")."""
    return not any(ln.startswith("Traceback (most recent call last)") for ln in stderr.splitlines())


# --------------------------------------------------------------------------- dsplan killed outright


def test_kill9_of_dsplan_takes_every_rank_down_and_the_rerun_finds_no_orphans(tmp_path):
    pids_file, run_dir = tmp_path / "pids", tmp_path / "run"
    cli = make_cli(tmp_path, "lf", "fake_ranks.py", "--ranks", "4", "--oom-rank", "-1", "--pid-file", str(pids_file))
    proc = start_run(cli, run_dir)
    try:
        wait_for(lambda: len(read_pids(pids_file)) >= 5 or proc.poll() is not None, "the 4 fake ranks")
        assert proc.poll() is None, proc.communicate()
        tree = processes(read_pids(pids_file) + [guardian_of(proc)])
        assert len(tree) == 6
        proc.kill()  # kill -9: dsplan gets no chance to clean up
        proc.wait()
        killed_at = time.monotonic()
        wait_for(lambda: not still_alive(tree), "the children of the killed dsplan to go", HANG)
        print(f"kill -9 of dsplan -> all {len(tree)} processes gone in {time.monotonic() - killed_at:.3f} s")
    finally:
        kill_all(read_pids(pids_file))
    r = dsplan_run(success_cli(tmp_path), run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "found no orphans" in r.stderr
    ledger = read_attempts(run_dir)
    assert [(a["attempt"], a["verdict"]) for a in ledger] == [(1, "interrupted"), (2, "success")]
    assert ledger[0]["unfinished"] and ledger[0]["ended"] is None
    assert "has no end record" in r.stderr
    assert not (run_dir / RECORD_FILE).exists() and not (run_dir / RESERVE_FILE).exists()


def test_rerun_ends_ranks_that_escaped_the_parent_death_signal(tmp_path):
    """Ranks that double-fork into sessions of their own, clear their parent-death signal
    and ignore SIGTERM, under a guardian that is killed together with dsplan: nothing
    is left to end them but the rerun, from the record in the run folder."""
    pids_file, run_dir = tmp_path / "pids", tmp_path / "run"
    cli = make_cli(tmp_path, "lf", "fake_escapees.py", "--ranks", "3", "--pid-file", str(pids_file))
    proc = start_run(cli, run_dir)
    try:
        wait_for(lambda: len(read_pids(pids_file)) >= 4 or proc.poll() is not None, "the escaping ranks")
        assert proc.poll() is None, proc.communicate()
        ranks = read_pids(pids_file)[1:]
        procs = processes(ranks)
        wait_for(lambda: set(ranks) <= recorded_pids(run_dir), "the ranks to be recorded in the run folder")
        guardian = guardian_of(proc)
        proc.send_signal(signal.SIGSTOP)  # so dsplan cannot notice anything in between
        os.kill(guardian, signal.SIGKILL)
        proc.kill()
        proc.wait()
        time.sleep(1.0)
        assert sorted(still_alive(procs)) == sorted(ranks)  # orphaned, out of everyone's reach
        r = dsplan_run(success_cli(tmp_path), run_dir)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "ending 3 orphaned processes" in r.stderr and "ended all 3" in r.stderr
        assert still_alive(procs) == []
        assert [a["verdict"] for a in read_attempts(run_dir)] == ["interrupted", "success"]
    finally:
        kill_all(read_pids(pids_file))


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _write_record(run_dir: Path, controller: dict, procs: list[dict]) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / RECORD_FILE).write_text(json.dumps({"controller": controller, "boot_id": None, "attempt": 1,
                                                   "processes": procs}))


def test_cleanup_checks_the_start_time_against_reused_pids(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_controller = {"pid": gone.pid, "start": "1"}
    victim = _sleeper()
    try:
        token = start_token(victim.pid)
        assert token is not None
        said = []
        # the pid is there, but it started at another time: a reused pid, not ours
        _write_record(tmp_path, dead_controller, [{"pid": victim.pid, "start": str(int(token) - 7), "cmd": "x"}])
        report = cleanup_orphans(tmp_path, said.append)
        assert report.ended == [] and victim.poll() is None
        assert "found no orphans" in said[-1] and not (tmp_path / RECORD_FILE).exists()
        # the same pid with its real start time: an orphan, ended
        _write_record(tmp_path, dead_controller, [{"pid": victim.pid, "start": token, "cmd": "sleeper"}])
        report = cleanup_orphans(tmp_path, said.append, grace=1.0)
        assert [e["pid"] for e in report.ended] == [victim.pid]
        assert victim.wait(timeout=HANG) == -signal.SIGTERM
        assert "ending 1 orphaned processes" in said[-2] and "sleeper" in said[-2]
    finally:
        victim.kill()


def test_cleanup_leaves_a_live_controllers_processes_alone_and_the_cleanup_command(tmp_path):
    controller, victim = _sleeper(), _sleeper()
    try:
        said = []
        _write_record(tmp_path, {"pid": controller.pid, "start": start_token(controller.pid)},
                      [{"pid": victim.pid, "start": start_token(victim.pid), "cmd": "sleeper"}])
        report = cleanup_orphans(tmp_path, said.append)
        assert report.skipped == "running" and victim.poll() is None and "still running" in said[-1]
        controller.kill()
        controller.wait()
        said.clear()
        assert cleanup_run_dir(tmp_path, said.append, grace=1.0) == 0
        assert victim.wait(timeout=HANG) == -signal.SIGTERM
        assert "dsplan run --cleanup: " in said[0] and "ending 1 orphaned" in said[0]
        said.clear()
        assert cleanup_run_dir(tmp_path, said.append) == 0
        assert said == [f"dsplan run --cleanup: no process list in {tmp_path}: the last dsplan there exited "
                        "cleanly; nothing to clean up"]
    finally:
        controller.kill()
        victim.kill()


# --------------------------------------------------------------------------- the run folder lock


def test_a_second_run_on_the_same_folder_exits_2_naming_the_holder(tmp_path):
    pids_file, run_dir = tmp_path / "pids", tmp_path / "run"
    cli = make_cli(tmp_path, "lf", "fake_ranks.py", "--ranks", "2", "--oom-rank", "-1", "--pid-file", str(pids_file))
    first = start_run(cli, run_dir)
    try:
        wait_for(lambda: len(read_pids(pids_file)) >= 3 or first.poll() is not None, "the first run's ranks")
        r = dsplan_run(cli, run_dir)
        assert r.returncode == 2
        assert stderr_lines(r.stderr) == [f"dsplan: error: --run-dir {run_dir} is in use by another dsplan run "
                                          f"(pid {first.pid}); wait for it to end, or choose another --run-dir"]
        assert len(read_pids(pids_file)) == 3  # the second run started nothing
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=HANG)
        assert first.returncode == 130
    finally:
        if first.poll() is None:
            first.kill()
        kill_all(read_pids(pids_file))


# --------------------------------------------------------------------------- full, read-only, unwritable


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (we mount it; skipped where mounting is not permitted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the full-disk tests mount a 2 MiB tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_success_is_recorded_on_a_2mib_disk_the_log_fills(tiny_disk, tmp_path):
    run_dir = tiny_disk / "run"
    first, second = ladder()[:2]
    cli = make_cli(tmp_path, "lf", "fake_flood.py", "--flood", str(4 * 1024 * 1024), "--flood-tiers", second,
                   "--oom-tiers", first)
    # first attempt runs out of memory (a little output), the second floods the disk and finishes
    r = dsplan_run(cli, run_dir, "--tier", first)
    assert r.returncode == 0, r.stderr[-2000:]
    assert no_traceback(r.stderr)
    assert "stopped writing train.log: No space left on device" in r.stderr
    ledger = read_attempts(run_dir)
    assert [(a["attempt"], a["verdict"]) for a in ledger] == [(1, "gpu_oom"), (2, "success")]
    assert "out of memory" in ledger[0]["evidence"]
    assert (run_dir / "attempt-002" / "train.log").stat().st_size > 1024 * 1024  # it did fill the disk
    assert not (run_dir / RESERVE_FILE).exists() and not (run_dir / RECORD_FILE).exists()
    lines = (run_dir / ATTEMPTS_FILE).read_bytes().splitlines()
    assert all(json.loads(ln) for ln in lines) and len(lines) == 4  # started + end line for each


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_before_an_attempt_is_one_line_and_leaves_no_folder(tiny_disk, tmp_path):
    run_dir = tiny_disk / "run"
    first = ladder()[0]
    cli = make_cli(tmp_path, "lf", "fake_flood.py", "--oom-tiers", first)
    r = dsplan_run(cli, run_dir, "--tier", first, "--max-attempts", "1")
    assert r.returncode == 3, r.stderr[-2000:]
    before = (run_dir / ATTEMPTS_FILE).read_bytes()
    _fill(tiny_disk)
    r = dsplan_run(cli, run_dir)
    assert r.returncode == 6, r.stderr[-2000:]
    assert no_traceback(r.stderr)
    last = stderr_lines(r.stderr)[-1]
    assert "No space left on device" in last and "are intact" in last
    assert (run_dir / ATTEMPTS_FILE).read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("attempt-")) == ["attempt-001"]
    assert not (run_dir / RESERVE_FILE).exists()


def test_no_room_to_record_an_attempt_is_one_line_and_leaves_no_folder(tiny_disk, tmp_path):
    """Room for the rendered files but not for the space an attempt's record is kept:
    the attempt never starts, and its folder goes."""
    run_dir = tiny_disk / "run"
    first = ladder()[0]
    cli = make_cli(tmp_path, "lf", "fake_flood.py", "--oom-tiers", first)
    r = dsplan_run(cli, run_dir, "--tier", first, "--max-attempts", "1")
    assert r.returncode == 3, r.stderr[-2000:]
    before = (run_dir / ATTEMPTS_FILE).read_bytes()
    _fill(tiny_disk)
    os.truncate(tiny_disk / "filler", (tiny_disk / "filler").stat().st_size - 32 * 1024)
    r = dsplan_run(cli, run_dir)
    assert r.returncode == 6, r.stderr[-2000:]
    assert no_traceback(r.stderr)
    last = stderr_lines(r.stderr)[-1]
    assert f"{run_dir / RESERVE_FILE}: No space left on device (setting aside 64 KiB for the attempt's record)" in last
    assert (run_dir / ATTEMPTS_FILE).read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("attempt-")) == ["attempt-001"]
    assert not (run_dir / RESERVE_FILE).exists()


def _earlier_attempt(run_dir: Path) -> bytes:
    append_attempt(run_dir, {"attempt": 1, "tier": "zero2", "micro_batch": 4, "grad_accum": 2, "cutoff_len": 1024,
                             "started": "2025-01-31T14:02:11+08:00", "ended": "2025-01-31T14:09:40+08:00",
                             "exit_code": 1, "verdict": "gpu_oom", "evidence": "CUDA out of memory",
                             "output_dir": str(run_dir / "attempt-001" / "output")})
    return (run_dir / ATTEMPTS_FILE).read_bytes()


def test_a_read_only_run_folder_is_one_line(tiny_disk, tmp_path):
    run_dir = tiny_disk / "run"
    before = _earlier_attempt(run_dir)
    r = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = dsplan_run(success_cli(tmp_path), run_dir)
    assert r.returncode == 2
    assert stderr_lines(r.stderr) == [f"dsplan: error: cannot write in --run-dir {run_dir}: Read-only file system"]
    assert (run_dir / ATTEMPTS_FILE).read_bytes() == before


def test_an_unwritable_run_folder_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    before = _earlier_attempt(run_dir)
    run_dir.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder unwritable for dsplan")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    try:
        r = subprocess.run([*prefix, sys.executable, "-m", "dsplan", "run", *BIG, "--lf-cli",
                            str(success_cli(tmp_path)), "--run-dir", str(run_dir)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    finally:
        run_dir.chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert stderr_lines(r.stderr) == [f"dsplan: error: cannot write in --run-dir {run_dir}: Permission denied"]
    assert sorted(p.name for p in run_dir.iterdir()) == [ATTEMPTS_FILE]
    assert (run_dir / ATTEMPTS_FILE).read_bytes() == before


# --------------------------------------------------------------------------- a terminal that stops reading


def test_a_blocked_stdout_does_not_hold_up_the_oom_kill(tmp_path):
    """dsplan's stdout is a pipe nobody reads: the child floods it, then runs out of memory."""
    pids_file, stamp, run_dir = tmp_path / "pids", tmp_path / "stamp", tmp_path / "run"
    first = ladder()[0]
    cli = make_cli(tmp_path, "lf", "fake_flood.py", "--flood", str(2 * 1024 * 1024), "--ranks", "2",
                   "--oom-tiers", first, "--pid-file", str(pids_file), "--oom-stamp", str(stamp))
    with open(tmp_path / "stderr", "wb") as err:
        proc = start_run(cli, run_dir, "--tier", first, "--no-fallback", stdout=subprocess.PIPE, stderr=err)
    try:
        wait_for(lambda: stamp.exists() or proc.poll() is not None, "the OOM line", 120)
        wait_for(lambda: len(read_pids(pids_file)) == 3, "the ranks", HANG)
        tree = processes(read_pids(pids_file))
        wait_for(lambda: not still_alive(tree), "the OOMing child and its ranks to be killed", HANG)
        print(f"stdout blocked: OOM line -> all gone in {time.time() - float(stamp.read_text()):.3f} s")
        proc.wait(timeout=HANG)  # and dsplan still exits although its stdout never drained
        assert proc.returncode == 3
        assert [a["verdict"] for a in read_attempts(run_dir)] == ["gpu_oom"]
    finally:
        proc.kill()
        proc.stdout.close()
        kill_all(read_pids(pids_file))


# --------------------------------------------------------------------------- the run loop


def test_a_signal_between_attempts_still_leaves_an_interrupted_record(tmp_path):
    run_dir = tmp_path / "run"
    first = ladder()[0]
    # the fake answers dsplan's SIGTERM after its OOM line by sending dsplan a SIGINT
    cli = make_cli(tmp_path, "lf", "fake_flood.py", "--oom-tiers", first, "--sigint-controller")
    r = dsplan_run(cli, run_dir, "--tier", first)
    assert r.returncode == 130, r.stderr[-2000:]
    ledger = read_attempts(run_dir)
    assert [(a["attempt"], a["verdict"]) for a in ledger] == [(1, "gpu_oom"), (2, "interrupted")]
    assert ledger[1]["evidence"] == "stop requested (signal to dsplan) before the attempt started"
    assert ledger[1]["tier"] != first and not ledger[1].get("unfinished")
    assert (run_dir / "attempt-002").is_dir() and not (run_dir / RESERVE_FILE).exists()


def test_an_lf_cli_that_cannot_execute_is_one_line_and_a_record(tmp_path):
    run_dir = tmp_path / "run"
    cli = tmp_path / "llamafactory-cli"
    cli.write_bytes(b"#!/bin/sh\r\nexec llamafactory-cli \"$@\"\r\n")  # saved on Windows
    cli.chmod(0o755)
    r = dsplan_run(cli, run_dir)
    assert r.returncode == 6, r.stderr[-2000:]
    assert no_traceback(r.stderr)
    line = f"cannot run {cli}: No such file or directory (its #! line ends in a carriage return: the file has " \
           "Windows (CRLF) line endings)"
    assert stderr_lines(r.stderr)[-1] == f"dsplan run: {line}"
    ledger = read_attempts(run_dir)
    assert [(a["verdict"], a["exit_code"], a["evidence"]) for a in ledger] == [("not_oom", None, line)]
    assert (run_dir / "attempt-001" / "dsplan.json").is_file()


def test_damaged_ledger_lines_are_named_and_the_run_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    first = ladder()[0]
    good = {"attempt": 1, "tier": first, "micro_batch": 1, "grad_accum": 1, "cutoff_len": 1024,
            "started": "2025-01-31T14:02:11+08:00", "ended": "2025-01-31T14:09:40+08:00", "exit_code": 1,
            "verdict": "gpu_oom", "evidence": "CUDA out of memory", "output_dir": str(run_dir / "x")}
    plan = json.loads(run_dsplan("plan", *BIG, "--json").stdout)
    tp = next(t for t in plan["tiers"] if t["tier"] == first)
    good.update(micro_batch=tp["micro_batch"], grad_accum=tp["grad_accum"])
    no_verdict = {k: v for k, v in dict(good, attempt=2).items() if k != "verdict"}
    run_dir.mkdir()
    (run_dir / ATTEMPTS_FILE).write_text(json.dumps(good) + "\n{not json at all\n" + json.dumps(no_verdict) + "\n")
    r = dsplan_run(success_cli(tmp_path), run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dsplan run: attempts.jsonl line 2: not JSON; skipped" in r.stderr
    assert "dsplan run: attempts.jsonl line 3: attempt record is missing verdict; skipped" in r.stderr
    assert f"not repeating tier {first}" in r.stderr  # the good record still counts
    assert [a["verdict"] for a in read_attempts(run_dir)] == ["gpu_oom", "success"]


def test_a_ledger_that_is_a_folder_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ATTEMPTS_FILE).mkdir(parents=True)
    r = dsplan_run(success_cli(tmp_path), run_dir)
    assert r.returncode == 2
    assert stderr_lines(r.stderr) == [f"dsplan: error: cannot read the ledger {run_dir / ATTEMPTS_FILE}: "
                                      "Is a directory"]
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [ATTEMPTS_FILE]
