"""`dsplan demo`: a real tier walk on the CPU, zero2 dies of a real allocation
failure, every rank is gone, zero3 finishes, under a per-rank cap measured on this machine.

The end-to-end test (marker ``real``) runs the command as a user would, about 5-6 minutes on
2 cores: two measuring runs and two attempts, each 2 gloo ranks of llamafactory-cli and
DeepSpeed.  While it runs, it takes handles on the processes dsplan lists for attempt 1
(``processes.json``), so it can check that none of them, ranks included, outlived the
attempt.  The other tests here check the plan, the cap rule and the sampler without torch.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dsplan.launch.ledger import read_attempts
from dsplan.launch.orphans import RECORD_FILE
from dsplan.launch.proctree import still_running
from dsplan.units import GiB
from tests.fakes.cpu_caps import cpu_capabilities, require

#: The whole command may take this long before the test gives up on it (it took 5-6 min here).
DEMO_TIMEOUT = 1500


# ---------------------------------------------------------------- without torch
def _wide_config(folder: Path) -> Path:
    """A config.json of the demo's wide model (all the planner reads), without weights."""
    from dsplan.demo.tiers import TIERS_SHAPE

    s = TIERS_SHAPE
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 8192,
        "hidden_size": s["hidden"], "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "tie_word_embeddings": False,
        "max_position_embeddings": 4096, "torch_dtype": "float32"}))
    return folder


def test_tiers_plan_walks_zero2_then_zero3_with_lean_zero3(tmp_path):
    from dsplan.demo.tiers import LEAN_ZERO3, explain_plan, tiers_plan, tiers_yaml
    from dsplan.plan.fallback import min_saving, next_step

    model = _wide_config(tmp_path / "wide")
    plan = tiers_plan(tiers_yaml(model, tmp_path / "data", "dsplan_demo", max_steps=2), model, 2)
    assert plan.ladder[:2] == ["zero2", "zero3"] and plan.profile.world_size == 2
    z2, z3 = plan.get("zero2"), plan.get("zero3")
    assert z2.estimate.gpu_bytes - z3.estimate.gpu_bytes >= min_saving(plan.profile)  # the planner's own rule
    zero = z3.ds.zero_optimization
    assert (zero.stage3_max_live_parameters, zero.stage3_max_reuse_distance) == tuple(LEAN_ZERO3.values())
    assert next_step(plan, "zero2", 1, 1, "host_oom") == ("zero3", 1, 1)  # a host OOM at zero2 goes to zero3
    text = " ".join(explain_plan(plan))
    assert "zero2 -> zero3" in text and "stage3_max_live_parameters 1e6" in text


def _peak(vm_peak: float, hwm: float) -> dict:
    return {"vm_peak_bytes": int(vm_peak * GiB), "vm_hwm_bytes": int(hwm * GiB)}


def test_cap_is_halfway_between_the_largest_ranks_or_refused_with_the_figures():
    from dsplan.demo.tiers import choose_cap

    cap = choose_cap(_peak(9.33, 3.24), _peak(8.19, 2.17))
    assert cap["limit"] == "RLIMIT_AS" and int(8.19 * GiB) < cap["cap_bytes"] < int(9.33 * GiB)
    assert abs(cap["cap_bytes"] - 8.76 * GiB) < 0.01 * GiB
    small = choose_cap(_peak(9.0, 3.0), _peak(8.8, 2.9))
    assert small["cap_bytes"] is None and "0.20 GiB" in small["why"] and "0.50 GiB" in small["why"]


def test_too_small_a_gap_says_so_and_shows_the_micro_batch_act_instead(tmp_path, monkeypatch):
    from dsplan.demo import demo
    from dsplan.demo.tiers import PEAKS_FILE, _micro_batch_instead, choose_cap, summarize_tiers

    mb_dir = tmp_path / "run"
    mb_dir.mkdir()
    monkeypatch.setattr(demo, "run_demo", lambda workdir, lf_cli, **kw: (0, mb_dir))
    z2 = {**_peak(9.0, 3.0), "ranks": [{"rank": 0, **_peak(9.0, 3.0)}], "steps": 1, "seconds": 30}
    z3 = {**_peak(8.8, 2.9), "ranks": [{"rank": 0, **_peak(8.8, 2.9)}], "steps": 1, "seconds": 30}
    record = {"nproc": 2, "peaks": {"zero2": z2, "zero3": z3}, "cap": choose_cap(z2, z3)}
    run_dir = tmp_path / "tiers" / "run"
    run_dir.mkdir(parents=True)
    said: list[str] = []
    code, out_dir = _micro_batch_instead(tmp_path, "llamafactory-cli", run_dir, record, said.append, 60, None)
    assert (code, out_dir) == (0, run_dir)
    assert json.loads((run_dir / PEAKS_FILE).read_text())["micro_batch_run"] == str(mb_dir)
    text = "\n".join(summarize_tiers(run_dir))
    assert "no cap: zero2's largest rank peaks only 0.20 GiB above zero3's" in text
    assert "instead, the micro-batch fall back:" in text and f"run folder: {mb_dir}" in text
    assert "too small" in said[0]


def test_rank_peaks_reads_each_rank_of_its_own_children(tmp_path):
    """The sampler finds processes that look like LF's ranks (``launcher.py`` with ``RANK``)
    among its descendants, each with its own marks, and ignores the others: another program,
    and a child a rank forked (same command line and environment)."""
    from dsplan.demo.tiers import RankPeaks

    launcher = tmp_path / "launcher.py"
    launcher.write_text("import os, sys, time\nblock = bytearray(int(sys.argv[1]) << 20)\n"
                        "if os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\ntime.sleep(30)\n")
    other = tmp_path / "other.py"
    other.write_text("import time\ntime.sleep(30)\n")
    kids = [subprocess.Popen([sys.executable, str(launcher), str(mb)], env={**os.environ, "RANK": str(rank)})
            for rank, mb in ((0, 96), (1, 32))]
    kids.append(subprocess.Popen([sys.executable, str(other)], env={**os.environ, "RANK": "7"}))
    try:
        time.sleep(1.5)
        sampler = RankPeaks()
        sampler.sample()
        ranks = sampler.ranks()
        forked = [c.pid for k in kids[:2] for c in psutil.Process(k.pid).children()]
    finally:
        for k in kids:
            for c in psutil.Process(k.pid).children():
                c.kill()
            k.kill()
            k.wait()
    assert len(forked) == 2
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["vm_hwm_bytes"] > ranks[1]["vm_hwm_bytes"] + 48 * 2**20
    assert all(r["vm_peak_bytes"] >= r["vm_hwm_bytes"] for r in ranks)


# ---------------------------------------------------------------- the real walk
def _watch_attempt_one(proc: subprocess.Popen, run_dir: Path) -> tuple[list[psutil.Process], set[int]]:
    """Handles on every process dsplan lists for attempt 1 of ``run_dir``, taken while it runs,
    until attempt 1 has its end record (or the command ends); and the ranks among them."""
    from dsplan.demo.tiers import rank_of

    handles: dict[int, psutil.Process] = {}
    ranks: dict[int, int] = {}
    deadline = time.monotonic() + DEMO_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            rec = json.loads((run_dir / RECORD_FILE).read_text())
        except (OSError, ValueError):
            rec = None
        for entry in rec.get("processes", []) if rec and rec.get("attempt") == 1 else []:
            try:
                handles.setdefault(entry["pid"], psutil.Process(entry["pid"]))
            except psutil.Error:
                pass
        for pid, h in handles.items():  # asked until known: a process may not have exec'd yet
            if pid not in ranks and (rank := rank_of(h)) is not None:
                ranks[pid] = rank
        if any(a["attempt"] == 1 and a.get("ended") for a in _ledger(run_dir)):  # its end record
            break
        time.sleep(0.2)
    return list(handles.values()), set(ranks.values())


def _ledger(run_dir: Path) -> list[dict]:
    try:
        return read_attempts(run_dir) if (run_dir / "attempts.jsonl").is_file() else []
    except (OSError, ValueError):
        return []


@pytest.mark.real
def test_demo_tiers_zero2_dies_every_rank_goes_zero3_finishes(tmp_path, train_python):
    from dsplan.demo.demo import cpu_env
    from dsplan.demo.tiers import PEAKS_FILE, RUN_STEPS

    require(cpu_capabilities(train_python, cpu_env(train_python)), precision="fp32", gloo=True, rlimit_as=True)
    workdir, run_dir = tmp_path / "demo", tmp_path / "demo" / "tiers" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dsplan", "demo", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        attempt_one, ranks_seen = _watch_attempt_one(proc, run_dir)
        left = still_running(attempt_one)  # attempt 1 has its end record: none of its processes may be left
        out, err = proc.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    record = json.loads((run_dir / PEAKS_FILE).read_text())
    z2, z3, cap = record["peaks"]["zero2"], record["peaks"]["zero3"], record["cap"]
    assert cap["cap_bytes"] is not None, f"gap too small on this machine: {cap}"
    assert z3["vm_peak_bytes"] < cap["cap_bytes"] < z2["vm_peak_bytes"], record
    assert cap["limit"] == "RLIMIT_AS" and len(z2["ranks"]) == len(z3["ranks"]) == record["nproc"] == 2
    assert all(r["vm_hwm_bytes"] > GiB for m in (z2, z3) for r in m["ranks"])  # real ranks, really measured
    assert str(cap["cap_bytes"]) in (workdir / "tiers" / "bin" / "llamafactory-cli-capped").read_text()

    ledger = read_attempts(run_dir)
    first, last = ledger[0], ledger[-1]
    assert [(a["tier"], a["verdict"]) for a in ledger] == [("zero2", "host_oom"), ("zero3", "success")]
    assert "can't allocate memory" in first["evidence"] and first["oom_figures"]["tried"] > 0
    assert "DefaultCPUAllocator" in (run_dir / "attempt-001" / "train.log").read_text(errors="replace")
    assert first["exit_code"] != 0 and last["exit_code"] == 0
    assert ranks_seen == {0, 1}, f"attempt 1's two ranks not seen among its {len(attempt_one)} processes"
    assert left == [], f"processes of attempt 1 still running after its end record: {left}"
    steps = [json.loads(x) for x in (Path(last["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    assert [s["current_steps"] for s in steps if "loss" in s] == list(range(1, RUN_STEPS + 1))
    for line in ("zero2 measured", "zero3 measured", "cap: RLIMIT_AS", "attempt 1: zero2", "attempt 2: zero3"):
        assert line in out, out
    assert "measuring zero2" in err and "falling back zero2 -> zero3" in err
