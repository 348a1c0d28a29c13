"""dsplan.logs.diagnose: reading log files and turning the verdict into advice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsplan.logs import diagnose as dg
from dsplan.logs.diagnose import Diagnosis, diagnose_file, diagnose_text
from dsplan.errors import UserError
from dsplan.logs.classifier import GPU_OOM, HOST_OOM, NOT_OOM, SUCCESS, UNKNOWN, classify_text

LOGS = Path(__file__).resolve().parent / "logs"
CORPUS = sorted(LOGS.glob("*.log"))

OOM_LINE = b"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total capacity of 79.25 GiB"


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_file_diagnosis(path):
    expected = path.name.split("__", 1)[0]
    d = diagnose_file(path)
    assert d.verdict == expected
    assert d.verdict == classify_text(path.read_bytes().decode("utf-8", errors="replace"), None).verdict
    assert diagnose_text(path.read_bytes().decode("utf-8", errors="replace")).verdict == expected
    if expected == UNKNOWN:
        assert d.evidence == []
    else:
        assert d.evidence and all(isinstance(e, str) and e for e in d.evidence)
        assert len(d.evidence) <= dg.MAX_EVIDENCE


def test_json_has_exactly_the_four_keys():
    d = diagnose_file(LOGS / "gpu_oom__rocm_hip.log")
    out = d.to_json()
    assert set(out) == {"verdict", "evidence", "backend", "suggestion"}
    assert out["verdict"] == GPU_OOM and out["backend"] == "rocm"
    assert isinstance(out["evidence"], list) and "HIP out of memory" in out["evidence"][0]
    assert json.loads(json.dumps(out)) == out
    assert [f for f in Diagnosis.__dataclass_fields__][:4] == ["verdict", "evidence", "backend", "suggestion"]


def test_suggestions_say_what_dsplan_does_next():
    gpu = diagnose_file(LOGS / "gpu_oom__cuda_multirank_interleaved.log")
    assert gpu.suggestion.startswith("GPU memory ran out: fall back to a tier with less GPU memory per card")
    assert "dsplan run does this by itself" in gpu.suggestion
    npu = diagnose_file(LOGS / "gpu_oom__npu_out_of_memory.log")
    assert "(npu)" in npu.suggestion and "fall back" in npu.suggestion
    host = diagnose_file(LOGS / "host_oom__lf_torchrun_sigkill_exit1.log")
    assert host.verdict == HOST_OOM and host.backend == "cpu"
    assert host.suggestion.startswith("host RAM ran out: do not move to an offload tier that needs more host RAM")
    assert any("SIGKILL" in e or "-9" in e for e in host.evidence)
    other = diagnose_file(LOGS / "not_oom__nccl_watchdog_timeout.log")
    assert other.verdict == NOT_OOM and other.backend is None
    assert other.suggestion.startswith("not a memory problem: fix the error above; dsplan does not fall back")
    assert "ddp_timeout" in other.suggestion
    ok = diagnose_file(LOGS / "success__lf_train_metrics.log")
    assert ok.verdict == SUCCESS and ok.evidence == ["***** train metrics *****"]
    unknown = diagnose_file(LOGS / "unknown__truncated.log")
    assert unknown.verdict == UNKNOWN and unknown.evidence == [] and "truncated" in unknown.suggestion


def test_missing_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.log"
    with pytest.raises(UserError) as exc:
        diagnose_file(missing)
    assert "\n" not in str(exc.value) and str(missing) in str(exc.value)
    with pytest.raises(UserError):
        diagnose_file(tmp_path)


def test_carriage_return_progress_bars_and_crlf(tmp_path):
    log = tmp_path / "train.log"
    log.write_bytes(b"[INFO] start\r\n" + b"".join(b"\r %3d%%|#  | %d/100" % (i, i) for i in range(100))
                    + b"\r" + OOM_LINE + b"\r\n")
    d = diagnose_file(log)
    assert d.verdict == GPU_OOM and d.backend == "cuda"
    assert d.evidence[0].startswith("torch.OutOfMemoryError")


def test_invalid_utf8_and_binary_noise(tmp_path):
    log = tmp_path / "noise.log"
    log.write_bytes(b"\xff\xfe\x00garbage\x80\x81\n" * 1000 + b"\x1b[31mMemoryError\x1b[0m\n" + bytes(range(256)))
    d = diagnose_file(log)
    assert d.verdict == HOST_OOM and d.evidence[0] == "MemoryError"


def test_huge_file_is_streamed(tmp_path):
    log = tmp_path / "big.log"
    filler = b"[INFO|trainer.py:2409] 2025-06-02 14:04:22,004 >> step ok, loss 1.2345\n"
    with open(log, "wb") as fh:
        for _ in range(40):
            fh.write(filler * 2000)
        fh.write(b"z" * (3 * dg.MAX_LINE_BYTES) + b"\n")  # one absurd line, longer than the cut
        fh.write(b"[rank1]: " + OOM_LINE + b"\n")
    d = diagnose_file(log)  # how fast: scripts/bench_classifier.py
    assert d.verdict == GPU_OOM


def test_very_long_line_keeps_an_oom_at_its_start(tmp_path):
    log = tmp_path / "long.log"
    log.write_bytes(OOM_LINE + b" " + b"q" * (2 * dg.MAX_LINE_BYTES))
    assert diagnose_file(log).verdict == GPU_OOM


def test_line_splitter_handles_block_boundaries(monkeypatch):
    import io

    monkeypatch.setattr(dg, "BLOCK_BYTES", 3)
    monkeypatch.setattr(dg, "MAX_LINE_BYTES", 5)
    data = b"ab\r\ncd\ref\ngh" + b"x" * 20 + b"\nij"
    # A \r\n split across two blocks yields one extra empty line, which readers skip.
    assert [x for x in dg._lines_of(io.BytesIO(data)) if x] == [b"ab", b"cd", b"ef", b"ghxxx", b"ij"]


def test_exit_code_can_be_given():
    text = "[INFO|trainer.py:2409] >> ***** Running training *****\n"
    assert diagnose_text(text).verdict == UNKNOWN
    assert diagnose_text(text, exit_code=0).verdict == SUCCESS
    assert diagnose_text(text, exit_code=137).verdict == HOST_OOM
    assert diagnose_text(text, exit_code=1).verdict == NOT_OOM


def test_importing_diagnose_does_not_import_torch():
    code = ("import sys, dsplan.logs.diagnose\n"
            "bad = [m for m in ('torch', 'deepspeed', 'llamafactory', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --- only regular files, and only a bounded part of them ------------------------------------------------

def _diagnose_cli(target: str) -> subprocess.CompletedProcess:
    """`dsplan diagnose TARGET` in a child; the timeout only turns a hang into a failure."""
    return subprocess.run([sys.executable, "-m", "dsplan", "diagnose", target], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])


def test_fifo_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "train.log"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading the usual way would block
    with pytest.raises(UserError) as exc:
        diagnose_file(fifo)
    assert "not a regular file" in str(exc.value) and "\n" not in str(exc.value)
    r = _diagnose_cli(str(fifo))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_is_refused():
    with pytest.raises(UserError) as exc:
        diagnose_file("/dev/zero")  # endless: reading it would never finish
    assert "not a regular file" in str(exc.value)
    r = _diagnose_cli("/dev/zero")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_directory_and_unreadable_file_are_one_line_errors(tmp_path):
    with pytest.raises(UserError) as exc:
        diagnose_file(tmp_path)
    assert "directory" in str(exc.value)
    locked = tmp_path / "locked.log"
    locked.write_text("MemoryError\n")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as a user who can read anything")
        with pytest.raises(UserError) as exc:
            diagnose_file(locked)
        assert "cannot read" in str(exc.value) and "\n" not in str(exc.value)
    finally:
        locked.chmod(0o600)


def test_a_long_log_is_read_only_at_its_head_and_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(dg, "HEAD_BYTES", 4096)
    monkeypatch.setattr(dg, "TAIL_BYTES", 8192)
    filler = b"[INFO|trainer.py:2409] 2025-06-02 14:04:22,004 >> step ok, loss 1.2345\n"
    middle = b"Traceback (most recent call last):\n" + OOM_LINE + b"\n"  # never read: between head and tail
    log = tmp_path / "long.log"
    log.write_bytes(filler * 200 + middle + filler * 200)
    d = diagnose_file(log)
    assert d.verdict == UNKNOWN and d.skipped_bytes == log.stat().st_size - 4096 - 8192
    assert "Only the first 0 MiB and the last 0 MiB" in d.suggestion
    log.write_bytes(filler * 400 + middle)  # in the tail
    assert diagnose_file(log).verdict == GPU_OOM
    log.write_bytes(middle + filler * 400)  # in the head
    assert diagnose_file(log).verdict == GPU_OOM
    short = tmp_path / "short.log"
    short.write_bytes(filler * 10 + middle)
    d = diagnose_file(short)
    assert d.verdict == GPU_OOM and d.skipped_bytes == 0 and "Only the first" not in d.suggestion


def test_head_and_tail_cut_whole_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(dg, "HEAD_BYTES", 10)
    monkeypatch.setattr(dg, "TAIL_BYTES", 10)
    log = tmp_path / "cut.log"
    log.write_bytes(b"aaaa\nbbbbbbbbbb-MemoryError\n" + b"x" * 50 + b"\nMemoryEr\nror\n")
    with open(log, "rb") as fh:
        lines = list(dg._raw_lines(fh, log.stat().st_size))
    assert lines == [b"aaaa", b"ror"]  # half lines at both cuts are dropped, never glued


# --- recovered OOMs -----------------------------------------------------------------------------------

RECOVERED_THEN_SUCCESS = (
    "[INFO|trainer.py:2409] 2025-06-02 14:04:22,004 >> ***** Running training *****\n"
    "WARNING 2025-06-02 14:05:10 train.py:88 caught torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
    "2.00 GiB. GPU 0 has a total capacity of 79.25 GiB; retrying with micro-batch 2\n"
    " 50%|#####     | 2/4 [00:01<00:01]\n"
    "{'train_runtime': 12.5, 'train_samples_per_second': 1.2, 'train_loss': 1.9, 'epoch': 1.0}\n"
    "***** train metrics *****\n"
)


def test_a_log_with_a_recovered_oom_that_ends_in_success_is_a_success(tmp_path):
    log = tmp_path / "recovered.log"
    log.write_text(RECOVERED_THEN_SUCCESS)
    d = diagnose_file(log)
    assert d.verdict == SUCCESS and d.evidence == ["***** train metrics *****"]
    assert "went on after it" in d.suggestion and "caught torch.OutOfMemoryError" in d.suggestion
    assert diagnose_file(log, exit_code=0).verdict == SUCCESS
    no_marker = tmp_path / "no_marker.log"
    no_marker.write_text(RECOVERED_THEN_SUCCESS.rsplit("{'train_runtime'", 1)[0])
    assert diagnose_file(no_marker).verdict == UNKNOWN  # never gpu_oom: the run went on after it
