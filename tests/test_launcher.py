"""The single-attempt launcher: process-group teardown, watchdog, stop requests,
hostile output, the attempt log and the progress line.

The training command is always a fake from ``tests/fakes/children/`` that prints
real-format log lines; they are classified by the real ``dsplan.logs.classifier``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dsplan.codes import EndReason
from dsplan.launch.attempt import run_attempt, running, stop_on_signals
from dsplan.launch.progress import ProgressLine, ProgressState, ProgressWatcher, format_progress
from dsplan.launch.streams import MAX_LINE, AttemptLog, BackgroundWriter, Echo, LineSplitter, QueuedEcho, echo_for
from dsplan.logs.classifier import (
    GPU_OOM,
    HOST_OOM,
    INTERRUPTED,
    NOT_OOM,
    STALLED,
    SUCCESS,
    Classifier,
)

REPO = Path(__file__).resolve().parents[1]
CHILDREN = Path(__file__).resolve().parent / "fakes" / "children"
FAKE_RANKS = CHILDREN / "fake_ranks.py"

# --------------------------------------------------------------------------- helpers


def read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def alive(pids) -> list[int]:
    """Pids still running (a zombie has released its memory and counts as gone)."""
    return running(pids)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_leftovers(pids):
    for pid in alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def ranks_argv(tmp_path: Path, *extra: str, ranks: int = 8, oom_rank: int = 3, oom_after: float = 1.0,
               backend: str = "cuda") -> list[str]:
    return [sys.executable, str(FAKE_RANKS), "--ranks", str(ranks), "--oom-rank", str(oom_rank),
            "--oom-after", str(oom_after), "--backend", backend, "--pid-file", str(tmp_path / "pids"),
            "--oom-stamp", str(tmp_path / "oom_stamp"), *extra]


# --------------------------------------------------------------------------- OOM teardown


@pytest.mark.parametrize("backend,escapee", [("cuda", "pgroup"), ("rocm", "session")])
def test_gpu_oom_kills_every_rank_at_once(tmp_path, backend, escapee):
    argv = ranks_argv(tmp_path, "--escapee", escapee, backend=backend)
    pids_file = tmp_path / "pids"
    try:
        out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "attempt.log", None, Classifier(),
                          stall_timeout=120, grace=3.0, echo=False)
        pids = read_pids(pids_file)
        assert len(pids) == 1 + 8 + 1  # torchrun, 8 ranks, and the helper that left the group/session
        assert alive(pids) == []  # how fast: scripts/bench_kill.py
        assert out.finding.verdict == GPU_OOM
        assert ("HIP" if backend == "rocm" else "CUDA") + " out of memory" in out.finding.evidence
        assert out.killed and out.kill_reason == "oom"
        assert out.exit_code == -signal.SIGTERM
        assert out.survivors == []
        assert out.started <= out.ended
        assert "out of memory" in (tmp_path / "attempt.log").read_text()
    finally:
        kill_leftovers(read_pids(pids_file))


def test_sigkill_escalation_when_sigterm_is_ignored(tmp_path):
    argv = ranks_argv(tmp_path, "--ignore-term", "--escapee", "pgroup")
    pids_file = tmp_path / "pids"
    grace = 0.5
    try:
        out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "attempt.log", None, Classifier(),
                          stall_timeout=120, grace=grace, echo=False)
        pids = read_pids(pids_file)
        assert len(pids) == 10
        assert alive(pids) == []  # how fast: scripts/bench_kill.py --ignore-term
        assert out.finding.verdict == GPU_OOM
        assert out.exit_code == -signal.SIGKILL  # SIGTERM was ignored: only SIGKILL could have done it
    finally:
        kill_leftovers(read_pids(pids_file))


@pytest.mark.real
def test_real_torchrun_ranks_are_all_killed(tmp_path, train_python):
    """The real torchrun puts every rank in a session (and process group) of its own,
    so killing the child's process group alone would leave the ranks running.  The
    rank program is a fake that imports nothing; only torchrun itself is real."""
    pids_file, stamp = tmp_path / "pids", tmp_path / "oom_stamp"
    argv = [train_python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
            str(CHILDREN / "torchrun_rank.py"), "--oom-rank", "2", "--oom-after", "2", "--worker",
            "--pid-file", str(pids_file), "--oom-stamp", str(stamp)]
    try:
        out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "attempt.log", None, Classifier(),
                          stall_timeout=120, grace=3.0, echo=False)
        pids = read_pids(pids_file)
        assert len(pids) == 8  # 4 ranks and one worker each; torchrun itself is out.pid
        assert alive(pids + [out.pid]) == []  # how fast: scripts/bench_kill.py --torchrun
        assert out.finding.verdict == GPU_OOM and out.kill_reason == "oom"
    finally:
        kill_leftovers(read_pids(pids_file))


@pytest.mark.parametrize("oom", [False, True])
def test_ranks_orphaned_by_a_dead_torchrun_are_found(tmp_path, monkeypatch, oom):
    """torchrun dies before dsplan has ever listed its ranks; they live on in sessions
    of their own, holding the output pipes.  dsplan finds them by those pipes."""
    import dsplan.launch.attempt as launcher

    monkeypatch.setattr(launcher, "_DRAIN_AFTER_EXIT", 1.0)
    monkeypatch.setattr(launcher, "_REFRESH_EVERY", 3600.0)  # make sure the ranks were never listed
    pids_file = tmp_path / "pids"
    argv = ranks_argv(tmp_path, "--die-after", "0.3", "--escapee", "session", ranks=4,
                      oom_rank=2 if oom else -1, oom_after=1.0)
    try:
        out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "a.log", None, Classifier(),
                          stall_timeout=60, grace=1.0, echo=False)
        pids = read_pids(pids_file)
        assert len(pids) == 1 + 4 + 1
        assert alive(pids) == []  # how fast: scripts/bench_kill.py --orphaned
        assert out.exit_code == 1  # the fake torchrun's own exit
        if oom:
            assert out.finding.verdict == GPU_OOM and out.kill_reason == "oom"
        else:
            assert out.kill_reason == "leftovers" and not out.killed
            assert out.finding.verdict == NOT_OOM
    finally:
        kill_leftovers(read_pids(pids_file))


def test_sigkilled_rank_is_host_oom(tmp_path):
    pids_file = tmp_path / "pids"
    argv = [sys.executable, str(CHILDREN / "fake_sigkilled_rank.py"), "--ranks", "2", "--victim", "1",
            "--after", "0.5", "--pid-file", str(pids_file)]
    try:
        out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "attempt.log", None, Classifier(),
                          stall_timeout=120, grace=3.0, echo=False)
        assert out.finding.verdict == HOST_OOM
        assert out.exit_code in (1, -signal.SIGTERM)  # exits 1 by itself, or is ended on the host_oom line
        assert alive(read_pids(pids_file)) == []
        assert "(exitcode: -9)" in (tmp_path / "attempt.log").read_text()  # torchrun's first report line
    finally:
        kill_leftovers(read_pids(pids_file))


# --------------------------------------------------------------------------- stop requests


def test_stop_event_interrupts_and_leaves_nothing(tmp_path):
    pids_file = tmp_path / "pids"
    stop = threading.Event()

    def stopper():
        wait_for(lambda: len(read_pids(pids_file)) >= 9, 30, "the fake ranks to start")
        stop.set()

    t = threading.Thread(target=stopper, daemon=True)
    t.start()
    try:
        out = run_attempt(ranks_argv(tmp_path, oom_rank=-1), dict(os.environ), tmp_path, tmp_path / "a.log", None,
                          Classifier(), stall_timeout=120, grace=1.0, echo=False, stop_event=stop)
        t.join(5)
        assert out.finding.verdict == INTERRUPTED
        assert out.finding.rule == "stop" and out.finding.backend is None
        assert out.killed and out.kill_reason == "interrupted"
        assert alive(read_pids(pids_file)) == []
    finally:
        kill_leftovers(read_pids(pids_file))


DRIVER = textwrap.dedent('''
    import json, os, signal, sys, threading
    sys.path.insert(0, {repo!r})
    from dsplan.launch.attempt import run_attempt, stop_on_signals
    from dsplan.logs.classifier import Classifier

    mode, argv, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    here = os.path.dirname(result)
    kw = dict(stall_timeout=120, grace=1.0, echo=False)
    stop = threading.Event()
    if mode == "handler":
        signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
        out = run_attempt(argv, dict(os.environ), here, os.path.join(here, "a.log"), None, Classifier(),
                          stop_event=stop, **kw)
    elif mode == "helper":
        with stop_on_signals(stop):
            out = run_attempt(argv, dict(os.environ), here, os.path.join(here, "a.log"), None,
                              Classifier(), stop_event=stop, **kw)
    else:  # no handler: Ctrl-C raises KeyboardInterrupt inside run_attempt
        # Python's own default, even if this process inherited SIGINT ignored (a shell
        # ignores SIGINT for background jobs, and CI may run the suite as one).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        out = run_attempt(argv, dict(os.environ), here, os.path.join(here, "a.log"), None, Classifier(),
                          **kw)
    with open(result, "w") as f:
        json.dump(dict(verdict=out.finding.verdict, killed=out.killed, exit_code=out.exit_code), f)
''')


@pytest.mark.parametrize("mode,sig", [("handler", signal.SIGINT), ("helper", signal.SIGTERM),
                                      ("none", signal.SIGINT)])
def test_signal_to_driver_leaves_no_orphans(tmp_path, mode, sig):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    pids_file = tmp_path / "pids"
    result = tmp_path / "result.json"
    argv = ranks_argv(tmp_path, "--escapee", "pgroup", oom_rank=-1)
    drv = subprocess.Popen([sys.executable, str(driver), mode, json.dumps(argv), str(result)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(read_pids(pids_file)) >= 10 or drv.poll() is not None, 60, "the fake ranks to start")
        assert drv.poll() is None, drv.communicate()
        time.sleep(0.3)  # let run_attempt settle into its loop
        drv.send_signal(sig)
        _, err = drv.communicate(timeout=60)
        pids = read_pids(pids_file)
        assert len(pids) == 10
        assert alive(pids) == []
        if mode == "none":
            assert drv.returncode != 0 and b"KeyboardInterrupt" in err
            assert not result.exists()
        else:
            assert drv.returncode == 0, err.decode(errors="replace")
            got = json.loads(result.read_text())
            assert got["verdict"] == INTERRUPTED and got["killed"]
    finally:
        if drv.poll() is None:
            drv.kill()
            drv.wait()
        kill_leftovers(read_pids(pids_file))


def test_stop_on_signals_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    ev = threading.Event()
    with stop_on_signals(ev, (signal.SIGTERM,)):
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(ev.is_set, 5, "the stop event")
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize("ignore_term", [False, True])
def test_stall_watchdog(tmp_path, ignore_term):
    pids_file = tmp_path / "pids"
    argv = [sys.executable, str(CHILDREN / "fake_staller.py"), "--pid-file", str(pids_file)]
    if ignore_term:
        argv.append("--ignore-term")
    try:
        out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "a.log", tmp_path / "out" / "trainer_log.jsonl",
                          Classifier(), stall_timeout=2, grace=0.5, echo=False)
        assert out.finding.verdict == STALLED
        assert out.finding.evidence == "no output and no step for 2 s"
        assert out.finding.rule == "watchdog" and out.finding.backend is None
        assert out.killed and out.kill_reason == "stalled"
        assert out.exit_code == (-signal.SIGKILL if ignore_term else -signal.SIGTERM)
        assert alive(read_pids(pids_file)) == []
        assert "Loading dataset" in (tmp_path / "a.log").read_text()
    finally:
        kill_leftovers(read_pids(pids_file))


def test_a_bare_oom_line_then_silence_ends_the_attempt_before_the_watchdog(tmp_path):
    """A rank that prints a bare OOM line (no traceback) and then hangs in a collective is ended
    once the confirmation wait passes, not after the stall timeout."""
    child = ("import sys, time\n"
             "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.', flush=True)\n"
             "time.sleep(600)\n")
    out = run_attempt([sys.executable, "-c", child], dict(os.environ), tmp_path, tmp_path / "a.log", None,
                      Classifier(), stall_timeout=300, grace=0.5, echo=False)
    assert out.finding.verdict == GPU_OOM and out.kill_reason == "oom"
    assert out.exit_code == -signal.SIGTERM


def test_trainer_log_steps_count_as_activity(tmp_path, capsys):
    """A run that prints nothing but keeps writing trainer_log.jsonl is not stalled."""
    outdir = tmp_path / "attempt-001"
    argv = [sys.executable, str(CHILDREN / "fake_trainer.py"), "--output-dir", str(outdir), "--steps", "8",
            "--interval", "0.3", "--quiet"]
    out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "a.log", outdir / "trainer_log.jsonl",
                      Classifier(), stall_timeout=1.5, grace=0.5, echo=True, progress=True,
                      progress_interval=0)
    assert out.finding.verdict == SUCCESS, out.finding
    assert out.exit_code == 0 and not out.killed
    assert out.last_step == 8
    err = capsys.readouterr().err
    assert "[dsplan] step " in err  # plain progress lines, since the captured stderr is not a terminal


def test_disabled_watchdog(tmp_path):
    argv = [sys.executable, "-c", "import time; time.sleep(1.5); print('done')"]
    out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "a.log", None, Classifier(),
                      stall_timeout=None, echo=False)
    assert out.finding.verdict == SUCCESS and out.exit_code == 0


# --------------------------------------------------------------------------- output handling


class RecordingClassifier:
    def __init__(self, inner):
        self.inner = inner
        self.lines: list[str] = []
        self.streams: list[str | None] = []

    def feed(self, line, stream=None):
        self.lines.append(line)
        self.streams.append(stream)
        return self.inner.feed(line, stream)

    @property
    def findings(self):
        return self.inner.findings

    def tick(self):
        return self.inner.tick()

    def conclude(self, exit_code):
        return self.inner.conclude(exit_code)


def test_garbage_and_huge_lines(tmp_path, monkeypatch):
    echoed_out, echoed_err = io.StringIO(), io.StringIO()  # (kept out of pytest's report: 2 MB of noise)
    monkeypatch.setattr(sys, "stdout", echoed_out)
    monkeypatch.setattr(sys, "stderr", echoed_err)
    copy, copy_err = tmp_path / "stdout.bin", tmp_path / "stderr.bin"
    argv = [sys.executable, str(CHILDREN / "fake_garbage.py"), "--stdout-copy", str(copy), "--stderr-copy",
            str(copy_err)]
    clf = RecordingClassifier(Classifier())
    out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "a.log", None, clf, stall_timeout=60,
                      echo=True)
    assert out.exit_code == 0
    assert out.finding.verdict == SUCCESS, out.finding
    # The log holds every byte, whole lines at a time: take out the stderr lines and what
    # remains is stdout, byte for byte.
    log = (tmp_path / "a.log").read_bytes()
    stderr_lines = copy_err.read_bytes().splitlines(keepends=True)
    assert len(stderr_lines) == 4
    for ln in stderr_lines:
        assert ln in log
        log = log.replace(ln, b"", 1)
    assert log == copy.read_bytes()
    # Lines reach the classifier capped in length, split on \r, \n and \r\n (also across reads), decoded.
    assert max(len(ln) for ln in clf.lines) <= MAX_LINE
    i = clf.lines.index("split crlf")
    assert clf.lines[i + 1] == "after split"
    assert "caf\u00e9 \u5f20" in clf.lines
    assert set(clf.streams) == {"stdout", "stderr"}  # every line comes with the name of its stream
    assert clf.streams[clf.lines.index("STDERR-LINE-1 starting")] == "stderr"
    assert "split crlf\r\nafter split\n" in echoed_out.getvalue()  # echoed as the child wrote it
    assert "STDERR-LINE-4" in echoed_err.getvalue()


def test_log_is_appended_and_argv_must_be_a_list(tmp_path):
    log = tmp_path / "logs" / "a.log"
    argv = [sys.executable, "-c", "import sys; print('hello out'); print('hello err', file=sys.stderr)"]
    for _ in range(2):
        out = run_attempt(argv, dict(os.environ), tmp_path, log, None, Classifier(), echo=False)
        assert out.exit_code == 0
    text = log.read_text()
    assert text.count("hello out\n") == 2 and text.count("hello err\n") == 2
    with pytest.raises(TypeError):
        run_attempt("echo hi", dict(os.environ), tmp_path, log, None, Classifier(), echo=False)


def test_failing_command_is_concluded_by_the_classifier(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('ValueError: bad dataset', file=sys.stderr); sys.exit(3)"]
    out = run_attempt(argv, dict(os.environ), tmp_path, tmp_path / "a.log", None, Classifier(), echo=False)
    assert out.exit_code == 3 and not out.killed and out.kill_reason == EndReason.EXITED
    assert out.finding.verdict == NOT_OOM


def test_missing_program_raises(tmp_path):
    with pytest.raises(OSError):
        run_attempt([str(tmp_path / "no-such-program")], dict(os.environ), tmp_path, tmp_path / "a.log", None,
                    Classifier(), echo=False)


def test_line_splitter():
    s = LineSplitter("stdout")
    assert s.split(b"a\r") == [(b"a", b"\r", True)]
    assert s.split(b"\nb\nc") == [(b"", b"\n", False), (b"b", b"\n", True)]
    assert s.split(b"\r\n") == [(b"c", b"\r\n", True)]
    assert s.split(b"x" * (MAX_LINE + 5)) == [(b"x" * MAX_LINE, b"", True)]
    assert s.split(b"", final=True) == [(b"x" * 5, b"", True)]


# --------------------------------------------------------------------------- progress


def write(path: Path, data: str, mode: str = "a"):
    with open(path, mode, encoding="utf-8") as f:
        f.write(data)


REC = {"current_steps": 12, "total_steps": 40, "loss": 1.234, "lr": 1e-05, "epoch": 0.9, "percentage": 30.0,
       "elapsed_time": "0:00:30", "remaining_time": "0:01:10"}


def test_progress_watcher(tmp_path):
    p = tmp_path / "out" / "trainer_log.jsonl"
    w = ProgressWatcher(p)
    assert w.poll() is False and w.state is None and w.last_step is None  # not there yet
    p.parent.mkdir()
    line = json.dumps(REC) + "\n"
    write(p, line[:20])
    assert w.poll() is True and w.state is None  # half a line: wait for the rest
    write(p, line[20:])
    assert w.poll() is True and w.last_step == 12
    assert w.poll() is False  # nothing new
    assert format_progress(w.state) == "step 12/40 (30%) loss 1.234 ETA 0:01:10"
    write(p, "not json\n" + json.dumps(dict(REC, current_steps=13)) + "\n")
    assert w.poll() and w.last_step == 13
    write(p, json.dumps(dict(REC, current_steps=1)) + "\n", mode="w")  # truncated and rewritten (shorter)
    assert w.poll() and w.last_step == 1
    p.unlink()
    assert w.poll() is True and w.state is None
    write(p, json.dumps(dict(REC, current_steps=2)) + "\n")
    assert w.poll() and w.last_step == 2


def test_progress_watcher_starts_from_the_tail_of_a_big_log(tmp_path):
    p = tmp_path / "trainer_log.jsonl"
    write(p, "".join(json.dumps(dict(REC, current_steps=i)) + "\n" for i in range(1, 5001)))
    w = ProgressWatcher(p)
    assert w.poll() and w.last_step == 5000


def test_format_progress_partial_records():
    assert format_progress(None) == "waiting for the first training step"
    assert format_progress(ProgressState(current_steps=3)) == "step 3"
    s = ProgressState(current_steps=5, total_steps=20, loss=0.123456)
    assert format_progress(s) == "step 5/20 (25%) loss 0.1235"


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_on_a_terminal():
    tty = FakeTTY()
    line = ProgressLine(Echo(tty, True), True, interval=30)
    line.set("step 1/2 (50%)")
    line.clear()
    line.redraw()
    assert tty.getvalue() == ("\r\x1b[K[dsplan] step 1/2 (50%)" "\r\x1b[K" "\r\x1b[K[dsplan] step 1/2 (50%)")


def test_progress_line_when_not_a_terminal():
    buf = io.StringIO()
    line = ProgressLine(Echo(buf, True), True, interval=0)
    line.set("step 1/2 (50%)")
    line.set("step 1/2 (50%)")  # unchanged: not repeated
    line.set("step 2/2 (100%)")
    assert buf.getvalue() == "[dsplan] step 1/2 (50%)\n[dsplan] step 2/2 (100%)\n"


# --------------------------------------------------------------------------- output that cannot keep up


def test_background_writer_drops_and_counts_when_its_sink_stalls():
    release, written = threading.Event(), []

    def sink(data: bytes) -> None:
        release.wait(30)
        written.append(data)

    w = BackgroundWriter(sink, limit=10, name="test", note=lambda n: f"<{n} dropped>".encode())
    assert w.put(b"aaaa")  # taken by the thread, which then stalls in the sink
    wait_for(lambda: not w._chunks, 5, "the writer to take the first bytes")
    assert w.put(b"bbbb")
    assert not w.put(b"cccc")  # 4 + 4 + 4 > 10: dropped, never blocked
    assert not w.put(b"ddd")
    assert w.dropped == 7
    release.set()
    assert w.put(b"ee")  # the note goes where the bytes were missing
    assert w.close(5)
    assert b"".join(written) == b"aaaabbbb<7 dropped>ee"


def test_echo_to_a_pipe_nobody_reads_never_blocks(tmp_path):
    r, w = os.pipe()
    stream = open(w, "w", encoding="utf-8")
    try:
        echo = echo_for(stream, True)
        assert isinstance(echo, QueuedEcho)
        line = "x" * 1023 + "\n"
        started = time.monotonic()
        for _ in range(8 * 1024):  # 8 MiB into a 64 KiB pipe
            echo.write(line)
        assert time.monotonic() - started < 10.0  # only guards a hang: a blocking write never returns
        assert echo.dropped > 4 * 1024 * 1024
        assert not echo.drain(0.2)  # still stuck, and that is fine
        os.close(r)  # the reader goes away: the writer stops, echoing turns off
        r = None
        wait_for(lambda: echo.writer.error is not None, 10, "the writer to notice the closed pipe")
        echo.write("more\n")
        assert not echo.enabled
    finally:
        if r is not None:
            os.close(r)
        stream.close()



def test_attempt_log_stops_on_a_full_disk_and_the_attempt_goes_on(tmp_path):
    log = AttemptLog(Path("/dev/full"))
    log.write(b"hello\n")
    wait_for(lambda: log.error is not None, 10, "the write to fail")
    assert log.problem() == ("[dsplan] stopped writing full: No space left on device; the attempt goes on and will "
                             "be recorded")
    assert log.problem() is None  # said once
    log.write(b"more\n")  # discarded quietly
    assert log.close(5)
    argv = [sys.executable, "-c", "print('training'); print('***** train metrics *****')"]
    out = run_attempt(argv, dict(os.environ), tmp_path, Path("/dev/full"), None, Classifier(), echo=False)
    assert out.finding.verdict == SUCCESS and out.exit_code == 0
    assert out.log_error == "No space left on device"


def test_the_guardian_passes_on_how_the_command_ended(tmp_path):
    for code, want in (("raise SystemExit(7)", 7), ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9)):
        out = run_attempt([sys.executable, "-c", code], dict(os.environ), tmp_path, tmp_path / "a.log", None,
                          Classifier(), echo=False)
        assert out.exit_code == want and out.command_pid not in (None, out.pid)


def test_the_guardian_acts_only_when_dsplan_is_really_gone(tmp_path):
    """A stray SIGUSR1 (a batch system's warning signal) and the end of the thread that
    started the attempt both reach the guardian as the parent-death signal; neither is
    dsplan dying, so the command runs on."""
    from dsplan.launch.guard import start_guarded

    argv = [sys.executable, "-c", "import time; time.sleep(0.5); print('finished')"]
    proc, _ = start_guarded(argv, dict(os.environ), tmp_path, grace=1.0)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.stdout.read() == b"finished\n" and proc.wait() == 0
    proc.stderr.close()
    box = {}
    t = threading.Thread(target=lambda: box.update(p=start_guarded(argv, dict(os.environ), tmp_path, grace=1.0)))
    t.start()
    t.join()
    proc, _ = box["p"]
    assert proc.stdout.read() == b"finished\n" and proc.wait() == 0
    proc.stderr.close()
