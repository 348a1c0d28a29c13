"""The attempts ledger (attempts.jsonl) and the attempt-NNN folders."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsplan.launch.ledger import (
    ATTEMPTS_FILE,
    FIELDS,
    MAX_EVIDENCE,
    RESERVE_BYTES,
    RESERVE_FILE,
    LedgerError,
    RunState,
    append_attempt,
    attempt_dir_number,
    load_ledger,
    next_attempt_dir,
    read_attempts,
    start_attempt,
    validate_record,
)

REPO = Path(__file__).resolve().parents[1]


def record(n: int = 1, **over) -> dict:
    rec = dict(attempt=n, tier="zero2", micro_batch=4, grad_accum=8, cutoff_len=2048,
               started="2025-01-31T14:02:11+08:00", ended="2025-01-31T14:09:40+08:00", exit_code=1,
               verdict="gpu_oom",
               evidence="[rank3]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB.",
               output_dir=f"/runs/r1/attempt-{n:03d}")
    rec.update(over)
    return rec


def test_round_trip(tmp_path):
    run = tmp_path / "run"
    a = append_attempt(run, record(1))
    b = append_attempt(run, record(2, tier="zero3", verdict="success", exit_code=0, evidence="",
                                   output_dir=run / "attempt-002", note="extra keys are kept"))
    got = read_attempts(run)
    assert got == [a, b]
    assert list(got[0])[:len(FIELDS)] == list(FIELDS)
    assert got[1]["output_dir"] == str(run / "attempt-002")  # a Path is stored as a string
    assert got[1]["note"] == "extra keys are kept"
    lines = (run / ATTEMPTS_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3  # one line per record, newline-terminated
    assert json.loads(lines[0]) == a


def test_missing_ledger_is_empty(tmp_path):
    assert read_attempts(tmp_path) == []


def test_truncated_last_line_is_dropped_and_next_append_is_clean(tmp_path):
    append_attempt(tmp_path, record(1))
    whole = json.dumps(record(2))
    with open(tmp_path / ATTEMPTS_FILE, "a") as f:
        f.write(whole[: len(whole) // 2])  # a crash mid-write
    assert [r["attempt"] for r in read_attempts(tmp_path)] == [1]
    append_attempt(tmp_path, record(3))
    assert [r["attempt"] for r in read_attempts(tmp_path)] == [1, 3]


@pytest.mark.parametrize("over,msg", [
    (dict(attempt=0), "attempt"),
    (dict(attempt=True), "attempt"),
    (dict(attempt="1"), "attempt"),
    (dict(micro_batch=0), "micro_batch"),
    (dict(grad_accum=2.0), "grad_accum"),
    (dict(cutoff_len=-1), "cutoff_len"),
    (dict(tier=""), "tier"),
    (dict(started="yesterday"), "started"),
    (dict(ended=None), "ended"),
    (dict(exit_code="1"), "exit_code"),
    (dict(verdict="oom"), "verdict"),
    (dict(evidence=3), "evidence"),
    (dict(output_dir=""), "output_dir"),
    (dict(extra=object()), "JSON"),
    (dict(extra=float("nan")), "JSON"),
])
def test_bad_records_are_refused(tmp_path, over, msg):
    with pytest.raises(LedgerError, match=msg):
        append_attempt(tmp_path, record(1, **over))
    assert read_attempts(tmp_path) == []


def test_missing_field_is_refused():
    rec = record(1)
    del rec["cutoff_len"]
    with pytest.raises(LedgerError, match="cutoff_len"):
        validate_record(rec)


@pytest.mark.parametrize("verdict", ["gpu_oom", "host_oom", "not_oom", "success", "stalled", "interrupted"])
def test_every_verdict_is_accepted(tmp_path, verdict):
    append_attempt(tmp_path, record(1, verdict=verdict, exit_code=None))
    assert read_attempts(tmp_path)[0]["verdict"] == verdict


def test_next_attempt_dir_counts_up_and_never_reuses(tmp_path):
    run = tmp_path / "run"
    assert next_attempt_dir(run) == run / "attempt-001"
    assert next_attempt_dir(run) == run / "attempt-002"
    (run / "attempt-007").mkdir()
    (run / "attempt-003.bak").mkdir()  # not an attempt folder
    assert next_attempt_dir(run) == run / "attempt-008"
    assert attempt_dir_number(run / "attempt-008") == 8
    assert attempt_dir_number(run / "notes") is None


def test_next_attempt_dir_past_999(tmp_path):
    (tmp_path / "attempt-999").mkdir()
    assert next_attempt_dir(tmp_path).name == "attempt-1000"
    assert next_attempt_dir(tmp_path).name == "attempt-1001"


def test_concurrent_next_attempt_dir_never_collides(tmp_path):
    """Several processes creating attempt folders in the same run folder at once
    each get folders of their own, and together they fill 1..N with no gaps."""
    procs, per = 6, 25
    code = ("import sys, time\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from dsplan.launch.ledger import next_attempt_dir\n"
            "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
            f"print('\\n'.join(next_attempt_dir(sys.argv[2]).name for _ in range({per})))\n")
    start_at = str(time.time() + 1.0)  # line them up so they really race
    ps = [subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path), start_at], stdout=subprocess.PIPE,
                           text=True) for _ in range(procs)]
    names = []
    for p in ps:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        names += out.split()
    assert len(names) == procs * per
    assert len(set(names)) == len(names)
    assert sorted(attempt_dir_number(n) for n in names) == list(range(1, procs * per + 1))


# --------------------------------------------------------------------------- started lines, reserve, damage


def started(n: int = 1, **over) -> dict:
    rec = {k: record(n)[k] for k in ("attempt", "tier", "micro_batch", "grad_accum", "cutoff_len", "started",
                                      "output_dir")}
    rec.update(over)
    return rec


def test_an_attempt_is_started_then_completed_with_its_space_set_aside(tmp_path):
    slot = start_attempt(tmp_path, started(1, pid=123))
    assert (tmp_path / RESERVE_FILE).stat().st_size == RESERVE_BYTES
    [rec] = read_attempts(tmp_path)
    assert rec["verdict"] == "interrupted" and rec["unfinished"] and rec["ended"] is None and rec["pid"] == 123
    slot.complete(record(1, verdict="success", exit_code=0, evidence=""))
    assert not (tmp_path / RESERVE_FILE).exists()
    [rec] = read_attempts(tmp_path)
    assert rec["verdict"] == "success" and "unfinished" not in rec
    lines = (tmp_path / ATTEMPTS_FILE).read_bytes().splitlines()
    assert [json.loads(ln).get("event") for ln in lines] == ["started", None]


def test_unfinished_attempts_read_as_interrupted_between_finished_ones(tmp_path):
    append_attempt(tmp_path, record(1))
    start_attempt(tmp_path, started(2)).release()  # its dsplan died: no end line
    start_attempt(tmp_path, started(3)).complete(record(3, verdict="success", exit_code=0))
    state = RunState.load(tmp_path)
    assert [(r.attempt, r.verdict, r.is_unfinished) for r in state.records] == [
        (1, "gpu_oom", False), (2, "interrupted", True), (3, "success", False)]
    assert state.highest == 3 and state.finished and state.problems == []


def test_old_ledgers_read_as_before(tmp_path):
    old = [record(1), record(2, verdict="success", exit_code=0, evidence="")]
    (tmp_path / ATTEMPTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in old))
    assert read_attempts(tmp_path) == old


def test_damaged_lines_are_skipped_and_named(tmp_path):
    no_verdict = {k: v for k, v in record(2).items() if k != "verdict"}
    text = (json.dumps(record(1)) + "\n" + "{oops\n" + json.dumps(no_verdict) + "\n" + "[1, 2]\n"
            + json.dumps(started(3, attempt=0, event="started")) + "\n" + json.dumps(record(4))[:40])
    (tmp_path / ATTEMPTS_FILE).write_text(text)
    ledger = load_ledger(tmp_path)
    assert [r.attempt for r in ledger.records] == [1]
    assert ledger.problems == [
        "attempts.jsonl line 2: not JSON; skipped",
        "attempts.jsonl line 3: attempt record is missing verdict; skipped",
        "attempts.jsonl line 4: attempt record must be a dict, got list; skipped",
        "attempts.jsonl line 5: attempt record: attempt must be a positive integer, got 0; skipped",
        "attempts.jsonl line 6: cut short (dsplan stopped while writing it?); skipped",
    ]


def test_a_ledger_that_is_a_folder_cannot_be_read(tmp_path):
    (tmp_path / ATTEMPTS_FILE).mkdir()
    with pytest.raises(IsADirectoryError):
        load_ledger(tmp_path)


def test_a_started_line_that_cannot_be_written_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import dsplan.launch.ledger as ledger

    def full(run_dir, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir))

    monkeypatch.setattr(ledger, "_append", full)
    with pytest.raises(OSError, match="No space"):
        start_attempt(tmp_path, started(1))
    assert not (tmp_path / RESERVE_FILE).exists() and read_attempts(tmp_path) == []


def test_end_lines_carry_bounded_evidence(tmp_path):
    slot = start_attempt(tmp_path, started(1))
    rec = slot.complete(record(1, evidence="x" * (MAX_EVIDENCE * 3)))
    assert len(rec["evidence"]) == MAX_EVIDENCE and rec["evidence"].endswith("\u2026")


def test_next_attempt_dir_counts_above_the_ledger(tmp_path):
    assert next_attempt_dir(tmp_path, after=4).name == "attempt-005"
