"""`dsplan report`: each attempt's estimate beside its measured peak, the error, the gap, a chart."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsplan.codes import Component, HostComponent
from dsplan.estimate.estimate import Estimate
from dsplan.launch.ledger import append_attempt, start_attempt
from dsplan.launch.measure import attempt_measurements
from dsplan.learn.report import MATCH_TOLERANCE, load_report, matching_component
from dsplan.units import GiB
from tests.conftest import run_dsplan

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
OLD_CUDA_OOM = ("torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB (GPU 0; 15.77 GiB "
                "total capacity; 13.10 GiB already allocated; 0.02 GiB free; 13.50 GiB reserved in total by PyTorch)")
HW = {"backend": "cuda", "gpu_name": "A100", "gpu_mem_bytes": 80 * GiB, "gpus_per_node": 1, "nodes": 1,
      "world_size": 1}


def g(x: float) -> int:
    return int(x * GiB)


def breakdown(logits: float = 2.30, activations: float = 3.0) -> dict[str, int]:
    return {"weights": g(8.0), "optimizer": g(0.5), "activations": g(activations), "logits": g(logits),
            "overhead": g(1.0)}


def end_record(run: Path, n: int, verdict: str = "success", evidence: str = "", tier: str = "zero2", **extra) -> dict:
    return {"attempt": n, "tier": tier, "micro_batch": 2, "grad_accum": 8, "cutoff_len": 2048,
            "started": "2025-01-01T10:00:00+00:00", "ended": "2025-01-01T10:05:00+00:00",
            "exit_code": 0 if verdict == "success" else 1, "verdict": verdict, "evidence": evidence,
            "output_dir": str(run / f"attempt-{n:03d}" / "output"), **extra}


def new_record(run: Path, n: int, verdict: str, *, parts: dict[str, int], measured: dict, figures=None,
               evidence: str = "", **extra) -> dict:
    est = {"gpu_bytes": sum(parts.values()), "host_bytes": g(40.0), "breakdown": parts,
           "host_breakdown": {"processes": g(10.0), "checkpoint_cache": g(30.0)}}
    full = {"vram_allocated_bytes": None, "vram_reserved_bytes": None, "host_peak_bytes": None, **measured}
    return end_record(run, n, verdict, evidence, estimate=est, measured=full, oom_figures=figures, **extra)


@pytest.fixture
def measured_run(tmp_path: Path) -> Path:
    """(a) two successes with logged vram peaks, one over and one under the estimate; (b) a GPU OOM."""
    run = tmp_path / "run"
    # 14.8 GiB estimated; reserved 16.0 -> -7.5 %, host 40 vs 32 -> +25 %
    append_attempt(run, new_record(run, 1, "gpu_oom", parts=breakdown(), evidence=OLD_CUDA_OOM,
                                   measured={"host_peak_bytes": g(32.0)}, figures=_figures(OLD_CUDA_OOM),
                                   hardware=HW))
    append_attempt(run, new_record(run, 2, "success", parts=breakdown(), tier="zero3", hardware=HW,
                                   measured={"vram_allocated_bytes": g(12.5), "vram_reserved_bytes": g(16.0),
                                             "host_peak_bytes": g(32.0)}))
    append_attempt(run, new_record(run, 3, "success", parts=breakdown(), tier="zero3", hardware=HW, preflight=True,
                                   measured={"vram_allocated_bytes": g(11.0), "vram_reserved_bytes": None,
                                             "host_peak_bytes": g(50.0)}))
    return run


def _figures(text: str) -> dict:
    from dsplan.logs.figures import oom_figures

    return oom_figures(text)


def test_measured_attempts_show_their_error(measured_run):
    rep = load_report(measured_run)
    second, third = rep.rows[1], rep.rows[2]
    assert second.gpu.estimate == sum(breakdown().values())
    assert second.gpu.peak == g(16.0) and second.gpu.source == "vram_reserved" and not second.gpu.bound
    assert second.gpu.error == pytest.approx((14.8 - 16.0) / 16.0, abs=1e-6)  # -7.5 %
    assert second.host.error == pytest.approx((40.0 - 32.0) / 32.0, abs=1e-6)  # +25 %
    assert third.gpu.peak == g(11.0) and third.gpu.source == "vram_allocated"  # no reserved figure: allocated
    assert third.gpu.error == pytest.approx((14.8 - 11.0) / 11.0, abs=1e-6)
    assert third.preflight and not second.preflight
    # underestimate, no OOM allocation to match: the largest transient component is named
    assert second.gap.component == "activations" and "underestimate by 1.20 GiB" in second.gap.text
    assert third.gap.component == "checkpoint_cache" and third.gap.text.startswith("host: underestimate")
    summary = rep.summary()
    assert summary["gpu"]["measured"] == 2 and summary["gpu"]["lower_bounds"] == 1
    assert summary["gpu"]["median_abs_error_pct"] == pytest.approx(100 * (1.2 / 16 + 3.8 / 11) / 2, abs=0.01)
    assert summary["gpu"]["worst_abs_error_pct"] == pytest.approx(100 * 3.8 / 11, abs=0.01)
    assert summary["gpu"]["worst_attempt"] == 3

    r = run_dsplan("report", str(measured_run))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "hardware: cuda A100, 80.0 GiB per GPU, world size 1" in out
    row2 = next(line for line in out.splitlines() if line.strip().startswith("2 "))
    assert row2.split() == ["2", "zero3", "2", "x", "8", "2048", "success", "14.80", "16.00", "12.50", "-7.5%",
                            "40.00", "32.00", "+25.0%"]
    assert "success (preflight)" in out
    assert "GPU error over 2 measured attempts: median |error| 21.0%, worst 34.5% (attempt 3); " \
           "1 OOM lower bound not counted" in out


def test_an_oom_gives_a_lower_bound_and_the_matching_component(measured_run):
    oom = load_report(measured_run).rows[0]
    # demand >= reserved 13.50 + tried 2.32 = 15.82 GiB; the estimate is short by at least that
    assert oom.gpu.bound and oom.gpu.source == "oom_figures"
    assert oom.gpu.peak == g(13.50) + g(2.32)
    assert oom.gpu.error == pytest.approx((14.8 - 15.82) / 15.82, abs=1e-3)
    # tried 2.32 GiB is within 10 % of the 2.30 GiB logits: named, not the larger activations
    assert oom.gap.component == "logits" and oom.gap.component_bytes == g(2.30)
    assert "the failed allocation matches logits (2.30 GiB estimated): fp32 logits" in oom.gap.text
    r = run_dsplan("report", str(measured_run))
    row1 = next(line for line in r.stdout.splitlines() if line.strip().startswith("1 "))
    assert "\u226515.82" in row1 and "\u2264-6.4%" in row1
    assert "attempt 1: OOM at 13.50 GiB reserved, 13.10 GiB allocated of 15.77 GiB, tried 2.32 GiB; the failed " \
           "allocation matches logits" in r.stdout


def test_matching_component_rule():
    parts = {"logits": g(2.0), "zero3_gather": g(2.15), "activations": g(6.0)}
    assert matching_component(g(2.17), parts) == "zero3_gather"  # the closest of two within tolerance
    assert matching_component(g(2.0) * (1 + MATCH_TOLERANCE) + GiB // 100, {"logits": g(2.0)}) is None
    assert matching_component(None, parts) is None and matching_component(g(2.0), {}) is None


@pytest.mark.parametrize("reserved,component,text", [
    ("14.50", "activations", "GPU: underestimate by at least 0.50 GiB (-3.3%); largest transient part: activations"),
    ("13.50", None, "ran out of memory although the estimate is above the 14.30 GiB known at failure"),
])
def test_an_oom_allocation_matching_no_component(tmp_path, reserved, component, text):
    """Demand >= reserved + 0.80 GiB, and no component is near 0.80 GiB: rule 2 (only for an underestimate)."""
    run = tmp_path / "run"
    evidence = OLD_CUDA_OOM.replace("2.32 GiB (GPU", "0.80 GiB (GPU").replace("13.50 GiB reserved",
                                                                            f"{reserved} GiB reserved")
    append_attempt(run, new_record(run, 1, "gpu_oom", parts=breakdown(), evidence=evidence, measured={},
                                   figures=_figures(evidence)))
    row = load_report(run).rows[0]
    assert row.gpu.bound and row.gpu.peak == g(float(reserved)) + g(0.8)
    assert row.gap.component == component
    assert text in row.gap.text, row.gap.text


def test_an_old_ledger_reports_with_blanks(tmp_path):
    run = tmp_path / "old"
    append_attempt(run, end_record(run, 1, "gpu_oom", OLD_CUDA_OOM))
    append_attempt(run, end_record(run, 2, "success", tier="zero3"))
    start_attempt(run, {k: v for k, v in end_record(run, 3, tier="zero3").items()
                        if k in ("attempt", "tier", "micro_batch", "grad_accum", "cutoff_len", "started",
                                 "output_dir")}).release()
    with open(run / "attempts.jsonl", "a") as f:
        f.write("{not json\n")
    r = run_dsplan("report", str(run))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:2] in ("1 ", "2 ", "3 ")]
    assert [row[6] for row in rows] == ["gpu_oom", "success", "unfinished"]
    assert all(row[7:] == ["-"] * 7 for row in rows)
    assert "no estimate recorded" in r.stdout and "GPU error: no measured attempt" in r.stdout
    assert "warning: attempts.jsonl line 4: not JSON; skipped" in r.stderr
    d = json.loads(run_dsplan("report", str(run), "--json").stdout)
    assert d["attempts"][0]["gpu"] == {"estimate_bytes": None, "peak_bytes": None, "peak_source": None,
                                       "lower_bound": False, "error_pct": None}
    assert d["attempts"][2]["unfinished"] is True and len(d["problems"]) == 1


def test_json_schema(measured_run):
    r = run_dsplan("report", str(measured_run), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert list(d) == ["run_dir", "attempts", "summary", "problems"]
    assert d["run_dir"] == str(measured_run) and d["problems"] == []
    a = d["attempts"][1]
    assert list(a) == ["attempt", "tier", "micro_batch", "grad_accum", "cutoff_len", "verdict", "unfinished",
                       "preflight", "hardware", "gpu", "host", "measured", "oom_figures", "gap"]
    assert a["gpu"] == {"estimate_bytes": sum(breakdown().values()), "peak_bytes": g(16.0),
                        "peak_source": "vram_reserved", "lower_bound": False, "error_pct": -7.5}
    assert a["measured"] == {"vram_allocated_bytes": g(12.5), "vram_reserved_bytes": g(16.0),
                             "host_peak_bytes": g(32.0)}
    assert a["hardware"] == HW and a["oom_figures"] is None
    assert set(a["gap"]) == {"component", "component_bytes", "text"}
    oom = d["attempts"][0]
    assert oom["gpu"]["lower_bound"] is True and oom["gpu"]["peak_source"] == "oom_figures"
    assert oom["oom_figures"]["tried"] == g(2.32) and oom["oom_figures"]["free"] == g(0.02)
    assert oom["gap"]["component"] == "logits"
    assert set(d["summary"]) == {"attempts", "gpu", "host"}
    assert d["summary"]["host"] == {"measured": 3, "lower_bounds": 0, "median_abs_error_pct": 25.0,
                                    "worst_abs_error_pct": 25.0, "worst_attempt": 1}  # ties: the first
    for side in ("gpu", "host"):
        assert all(isinstance(x[side]["estimate_bytes"], int) for x in d["attempts"])


def test_damaged_new_keys_are_blanks_not_a_crash(tmp_path):
    run = tmp_path / "run"
    append_attempt(run, end_record(run, 1, estimate={"gpu_bytes": "lots", "breakdown": [1, 2]},
                                   measured={"vram_reserved_bytes": -1, "host_peak_bytes": True},
                                   oom_figures="?", hardware="A100", preflight="yes"))
    d = json.loads(run_dsplan("report", str(run), "--json").stdout)["attempts"][0]
    assert d["gpu"]["estimate_bytes"] is None and d["measured"]["vram_reserved_bytes"] is None
    assert d["measured"]["host_peak_bytes"] is None and d["oom_figures"] is None
    assert d["hardware"] is None and d["preflight"] is False


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'dsplan[plot]')")
def test_plot_writes_a_png_and_refuses_to_overwrite(measured_run, tmp_path):
    png = tmp_path / "charts" / "report.png"
    r = run_dsplan("report", str(measured_run), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert f"wrote {png}" in r.stdout
    r = run_dsplan("report", str(measured_run), "--plot", str(png))
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and png.read_bytes() == data
    r = run_dsplan("report", str(measured_run), "--plot", str(png), "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["attempts"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in png.parent.iterdir() if p.name.endswith(".tmp")]


def test_plot_without_matplotlib_says_what_to_install(measured_run, tmp_path):
    code = ("import sys\n"
            "sys.modules['matplotlib'] = None\n"  # import matplotlib -> ImportError
            "from dsplan.cli import cli\n"
            f"cli.main(['report', {str(measured_run)!r}, '--plot', {str(tmp_path / 'x.png')!r}], prog_name='dsplan')\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "dsplan: error: --plot needs matplotlib: pip install 'dsplan[plot]'"
    assert not (tmp_path / "x.png").exists()


def test_report_imports_no_training_stack_and_matplotlib_only_for_plot(measured_run):
    code = ("import sys, atexit\n"
            "def check():\n"
            "    bad = [m for m in ('torch', 'deepspeed', 'llamafactory', 'transformers', 'matplotlib')\n"
            "           if m in sys.modules]\n"
            "    sys.stderr.write('HEAVY:' + ','.join(bad) + '\\n')\n"
            "atexit.register(check)\n"
            "from dsplan.cli import cli\n"
            f"cli.main(['report', {str(measured_run)!r}], prog_name='dsplan')\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "HEAVY:\n" in r.stderr, r.stderr


@pytest.mark.parametrize("make", ["missing", "no_ledger", "a_file"])
def test_missing_run_folder_or_ledger_is_one_line_exit_2(tmp_path, make):
    target = tmp_path / "runs"
    if make == "no_ledger":
        target.mkdir()
    elif make == "a_file":
        target.write_text("x")
    r = run_dsplan("report", str(target))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1
    assert ("has no attempts.jsonl" if make == "no_ledger" else "no run folder") in r.stderr


def test_an_empty_ledger_reports_no_attempt(tmp_path):
    (tmp_path / "attempts.jsonl").write_text("")
    r = run_dsplan("report", str(tmp_path))
    assert r.returncode == 0 and "no attempt recorded in attempts.jsonl yet" in r.stdout


def test_a_ledger_written_from_attempt_measurements_reads_back(tmp_path):
    """End to end: the fields the launcher records, from a real Estimate, a trainer_log and OOM evidence."""
    run = tmp_path / "run"
    out = run / "attempt-001" / "output"
    out.mkdir(parents=True)
    (out / "trainer_log.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"current_steps": 1, "loss": 2.0, "vram_allocated": 9.5, "vram_reserved": 11.0},
        {"current_steps": 2, "loss": 1.9, "vram_allocated": 10.25, "vram_reserved": 12.5})) + "\n")
    est = Estimate(tier="zero2", gpu={Component.WEIGHTS: g(8), Component.ACTIVATIONS: g(1.5),
                                      Component.LOGITS: g(2.25), Component.OVERHEAD: g(0.75)},
                   host={HostComponent.PROCESSES: g(6), HostComponent.CHECKPOINT_CACHE: g(14)})
    for n, verdict, evidence in ((1, "success", ""), (2, "gpu_oom", OLD_CUDA_OOM)):
        fields = attempt_measurements(est, out / "trainer_log.jsonl" if n == 1 else out / "none.jsonl",
                                      g(18) if n == 1 else None, evidence, verdict)
        append_attempt(run, end_record(run, n, verdict, evidence, **fields))
    ok, oom = load_report(run).rows
    assert ok.gpu.estimate == g(12.5) and ok.gpu.peak == g(12.5) and ok.gpu.error == pytest.approx(0, abs=1e-6)
    assert ok.measured["vram_allocated_bytes"] == g(10.25)
    assert ok.host.estimate == g(20) and ok.host.peak == g(18)
    assert ok.gap.text == "GPU: the estimate covers the peak by 0.00 GiB (+0.0%)"
    assert oom.gpu.bound and oom.gpu.peak == g(13.5) + g(2.32) and oom.host.peak is None
    assert oom.gap.component == "logits"
