"""`dsplan report`: each attempt's estimate beside its measured peak, the error, the gap, a chart."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsplan.codes import Component, HostComponent
from dsplan.estimate.estimate import Estimate, Runtime
from dsplan.inputs.request import Request, resolve
from dsplan.launch.ledger import append_attempt, start_attempt
from dsplan.launch.measure import (
    attempt_measurements,
    hardware_fields,
    plan_assumptions,
)
from dsplan.learn.report import MATCH_TOLERANCE, load_report, matching_component
from dsplan.learn.samples import read_samples
from dsplan.plan.planner import estimate_at, make_plan
from dsplan.units import GiB
from tests.conftest import run_dsplan

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
#: A V100 16GB's OOM in PyTorch's older wording (its 15.77 GiB total is what torch reports for that card).
OLD_CUDA_OOM = ("torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB (GPU 0; 15.77 GiB "
                "total capacity; 13.10 GiB already allocated; 0.02 GiB free; 13.50 GiB reserved in total by PyTorch)")
HW = {"backend": "cuda", "gpu_name": "V100", "gpu_mem_bytes": 16 * GiB, "gpus_per_node": 1, "nodes": 1,
      "world_size": 1}
CONTEXT = int(0.75 * GiB)  # what the fixture's estimates record as their context (cuda's default)


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
               evidence: str = "", transient: int | None = None, **extra) -> dict:
    est = {"transient_bytes": transient, "gpu_bytes": sum(parts.values()), "host_bytes": g(40.0), "breakdown": parts,
           "host_breakdown": {"processes": g(30.0), "checkpoint_cache": g(10.0)}, "context_bytes": CONTEXT,
           "nccl_bytes": g(0.5), "headroom_shift": 0.0, "seq_len": 2048, "tokens": 4096, "planned_at": "cutoff_len"}
    full = {"vram_allocated_bytes": None, "vram_reserved_bytes": None, "host_peak_bytes": None, **measured}
    return end_record(run, n, verdict, evidence, estimate=est, measured=full, oom_figures=figures, **extra)


@pytest.fixture
def measured_run(tmp_path: Path) -> Path:
    """(a) two successes with logged vram peaks, one over and one under the estimate; (b) a GPU OOM.
    14.80 GiB estimated, 1.00 of it overhead and 0.75 context: a reserved peak is compared with
    14.05, an allocated one with 13.80; the host's 40 GiB less 10 GiB page cache with the VmHWM sum."""
    run = tmp_path / "run"
    append_attempt(run, new_record(run, 1, "gpu_oom", parts=breakdown(), evidence=OLD_CUDA_OOM,
                                   measured={"host_peak_bytes": g(24.0)}, figures=_figures(OLD_CUDA_OOM),
                                   hardware=HW))
    append_attempt(run, new_record(run, 2, "success", parts=breakdown(), tier="zero3", hardware=HW,
                                   measured={"vram_allocated_bytes": g(12.5), "vram_reserved_bytes": g(15.0),
                                             "host_peak_bytes": g(24.0)}))
    append_attempt(run, new_record(run, 3, "success", parts=breakdown(), tier="zero3", hardware=HW, preflight=True,
                                   measured={"vram_allocated_bytes": g(11.5), "vram_reserved_bytes": None,
                                             "host_peak_bytes": g(37.5)}))
    return run


def _figures(text: str) -> dict:
    from dsplan.logs.figures import oom_figures

    return oom_figures(text)


def test_measured_attempts_show_their_error(measured_run):
    rep = load_report(measured_run)
    second, third = rep.rows[1], rep.rows[2]
    assert second.gpu.estimate == sum(breakdown().values())
    assert second.gpu.peak == g(15.0) and second.gpu.source == "vram_reserved" and not second.gpu.bound
    # a reserved peak never holds the context: compared with 14.80 - 0.75
    assert second.gpu.compared == sum(breakdown().values()) - CONTEXT
    assert second.gpu.error == pytest.approx((14.05 - 15.0) / 15.0, abs=1e-6)  # -6.3 %
    assert second.host.compared == g(30.0)  # the page cache is not resident memory
    assert second.host.error == pytest.approx((30.0 - 24.0) / 24.0, abs=1e-6)  # +25 %
    # no reserved figure: allocated, compared with the estimate less its whole overhead
    assert third.gpu.peak == g(11.5) and third.gpu.source == "vram_allocated"
    assert third.gpu.compared == g(13.8)
    assert third.gpu.error == pytest.approx((13.8 - 11.5) / 11.5, abs=1e-6)
    assert third.preflight and not second.preflight
    # underestimate, no OOM allocation to match: the largest transient component is named
    assert second.gap.component == "activations" and "underestimate by 0.95 GiB" in second.gap.text
    assert third.gap.component == "processes" and third.gap.text.startswith("host: underestimate by 7.50 GiB")
    assert second.notes == [] and third.notes == []
    summary = rep.summary()
    assert summary["gpu"]["measured"] == 2 and summary["gpu"]["lower_bounds"] == 1
    assert summary["gpu"]["median_abs_error_pct"] == pytest.approx(100 * (0.95 / 15 + 2.3 / 11.5) / 2, abs=0.01)
    assert summary["gpu"]["worst_abs_error_pct"] == pytest.approx(100 * 2.3 / 11.5, abs=0.01)
    assert summary["gpu"]["worst_attempt"] == 3

    r = run_dsplan("report", str(measured_run))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "hardware: cuda V100, 16.0 GiB per GPU, world size 1" in out
    head = next(line for line in out.splitlines() if line.strip().startswith("#"))
    assert "GPU est" in head and "peak kind" in head and "est compared" in head and "est w/o cache" in head
    row2 = next(line for line in out.splitlines() if line.strip().startswith("2 "))
    assert row2.split() == ["2", "zero3", "2", "x", "8", "2048", "success", "14.80", "reserved", "14.05", "15.00",
                            "-6.3%", "40.00", "30.00", "24.00", "+25.0%"]
    row3 = next(line for line in out.splitlines() if line.strip().startswith("3 "))
    assert row3.split()[6:13] == ["success", "(preflight)", "14.80", "allocated", "13.80", "11.50", "+20.0%"]
    assert "GPU error over 2 measured attempts: median |error| 13.2%, worst 20.0% (attempt 3); " \
           "1 OOM lower bound not counted" in out


def test_an_oom_gives_a_lower_bound_and_the_matching_component(measured_run):
    oom = load_report(measured_run).rows[0]
    # demand >= reserved 13.50 + tried 2.32 = 15.82 GiB, the allocator's figures: compared like reserved
    assert oom.gpu.bound and oom.gpu.source == "oom_figures" and oom.gpu.kind == "oom_bound"
    assert oom.gpu.peak == g(13.50) + g(2.32) and oom.gpu.compared == sum(breakdown().values()) - CONTEXT
    assert oom.gpu.error == pytest.approx((14.05 - 15.82) / 15.82, abs=1e-3)
    # tried 2.32 GiB is within 10 % of the 2.30 GiB logits: named, not the larger activations
    assert oom.gap.component == "logits" and oom.gap.component_bytes == g(2.30)
    assert "the failed allocation matches logits (2.30 GiB estimated): fp32 logits" in oom.gap.text
    r = run_dsplan("report", str(measured_run))
    row1 = next(line for line in r.stdout.splitlines() if line.strip().startswith("1 "))
    assert "OOM bound" in row1 and "\u226515.82" in row1 and "\u2264-11.2%" in row1
    assert "attempt 1: OOM at 13.50 GiB reserved, 13.10 GiB allocated of 15.77 GiB, tried 2.32 GiB; the failed " \
           "allocation matches logits" in r.stdout


@pytest.mark.parametrize("component", ["overhead", "weights", "optimizer", "gradients"])
def test_a_failed_allocation_never_matches_an_aggregate(tmp_path, component):
    """weights, gradients, optimizer states and overhead are many allocations: none has their size."""
    run = tmp_path / "run"
    parts = {**breakdown(activations=6.0), "gradients": g(1.6)}
    tried = parts[component] / GiB
    evidence = OLD_CUDA_OOM.replace("2.32 GiB (GPU", f"{tried:.2f} GiB (GPU")
    append_attempt(run, new_record(run, 1, "gpu_oom", parts=parts, evidence=evidence, measured={},
                                   figures=_figures(evidence), hardware=HW))
    row = load_report(run).rows[0]
    assert row.gap.component != component
    assert "failed allocation matches" not in row.gap.text
    assert matching_component(parts[component], parts) is None
    assert matching_component(parts["logits"], parts) == "logits"


def test_matching_component_rule():
    parts = {"logits": g(2.0), "zero3_gather": g(2.15), "activations": g(6.0), "weights": g(2.17)}
    assert matching_component(g(2.17), parts) == "zero3_gather"  # the closest single allocation within tolerance
    assert matching_component(g(2.0) * (1 + MATCH_TOLERANCE) + GiB // 100, {"logits": g(2.0)}) is None
    assert matching_component(None, parts) is None and matching_component(g(2.0), {}) is None


@pytest.mark.parametrize("reserved,component,text", [
    ("13.75", "activations", "GPU: underestimate by at least 0.50 GiB (-3.4%); largest transient part: activations"),
    ("12.75", None, "ran out of memory although the estimate is above the 13.55 GiB known at failure"),
])
def test_an_oom_allocation_matching_no_component(tmp_path, reserved, component, text):
    """Demand >= reserved + 0.80 GiB, and no component is near 0.80 GiB: rule 2 (only for an underestimate).
    The estimate a reserved bound is held against is 14.80 - 0.75 context = 14.05 GiB."""
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
    assert all(row[7:] == ["-"] * 9 for row in rows)
    assert "no estimate recorded" in r.stdout and "GPU error: no measured attempt" in r.stdout
    assert "warning: attempts.jsonl line 4: not JSON; skipped" in r.stderr
    d = json.loads(run_dsplan("report", str(run), "--json").stdout)
    assert d["attempts"][0]["gpu"] == {"estimate_bytes": None, "compared_bytes": None, "compared_as": None,
                                       "peak_bytes": None, "peak_source": None, "lower_bound": False,
                                       "error_pct": None}
    assert d["attempts"][2]["unfinished"] is True and len(d["problems"]) == 1


def test_json_schema(measured_run):
    r = run_dsplan("report", str(measured_run), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert list(d) == ["run_dir", "attempts", "summary", "problems"]
    assert d["run_dir"] == str(measured_run) and d["problems"] == []
    a = d["attempts"][1]
    assert list(a) == ["attempt", "tier", "micro_batch", "grad_accum", "cutoff_len", "verdict", "unfinished",
                       "preflight", "hardware", "gpu", "host", "measured", "oom_figures", "gap", "notes"]
    whole = sum(breakdown().values())
    assert a["gpu"] == {"estimate_bytes": whole, "compared_bytes": whole - CONTEXT,
                        "compared_as": "estimate - context - NCCL", "peak_bytes": g(15.0),
                        "peak_source": "vram_reserved", "lower_bound": False, "error_pct": -6.33}
    assert a["host"]["compared_as"] == "host estimate - page cache" and a["host"]["compared_bytes"] == g(30.0)
    assert a["measured"] == {"vram_allocated_bytes": g(12.5), "vram_reserved_bytes": g(15.0),
                             "host_peak_bytes": g(24.0)}
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
    """End to end: the fields the launcher records, from a real Estimate, a trainer_log and OOM evidence.
    Attempt 1 records its context (0.75 GiB), attempt 3 is an older ledger's record without it."""
    run = tmp_path / "run"
    out = run / "attempt-001" / "output"
    out.mkdir(parents=True)
    (out / "trainer_log.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"current_steps": 1, "loss": 2.0, "vram_allocated": 9.5, "vram_reserved": 11.0},
        {"current_steps": 2, "loss": 1.9, "vram_allocated": 10.25, "vram_reserved": 11.75})) + "\n")
    est = Estimate(tier="zero2", gpu={Component.WEIGHTS: g(8), Component.ACTIVATIONS: g(1.5),
                                      Component.LOGITS: g(2.25), Component.OVERHEAD: g(0.75)},
                   host={HostComponent.PROCESSES: g(6), HostComponent.CHECKPOINT_CACHE: g(14)})
    assumed = {"context_bytes": g(0.75), "nccl_bytes": g(0.5), "headroom_shift": 0.0}
    for n, verdict, evidence, known in ((1, "success", "", assumed), (2, "gpu_oom", OLD_CUDA_OOM, assumed),
                                        (3, "success", "", None)):
        fields = attempt_measurements(est, out / "trainer_log.jsonl" if n != 2 else out / "none.jsonl",
                                      g(6) if n != 2 else None, evidence, verdict, known)
        append_attempt(run, end_record(run, n, verdict, evidence, hardware=HW, **fields))
    ok, oom, old = load_report(run).rows
    assert ok.gpu.estimate == g(12.5) and ok.gpu.compared == g(11.75) and ok.gpu.peak == g(11.75)
    assert ok.gpu.error == pytest.approx(0, abs=1e-6) and ok.notes == []
    assert ok.measured["vram_allocated_bytes"] == g(10.25)
    assert ok.host.estimate == g(20) and ok.host.compared == g(6) and ok.host.peak == g(6)  # no page cache
    assert ok.gap.text == "GPU: the estimate covers the peak by 0.00 GiB (+0.0%)"
    assert oom.gpu.bound and oom.gpu.peak == g(13.5) + g(2.32) and oom.host.peak is None
    assert oom.gap.component == "logits"
    # no context recorded: cuda's default is assumed, and the report says so
    assert old.gpu.compared == g(12.5) - Runtime.default("cuda").context_bytes
    assert old.notes == ["context not recorded (an older dsplan): dsplan's default for cuda assumed (0.75 GiB)"]
    r = run_dsplan("report", str(run))
    assert "note (attempt 3): context not recorded (an older dsplan): dsplan's default for cuda assumed" in r.stdout


# ------------------------------------------------------------------------ peaks exactly as the defaults model them
def _plan(gpus: str):
    inputs = resolve(Request(gpus=gpus, gpu_name="H100", model="Qwen2.5-7B", method="lora"))
    return make_plan(inputs.profile, inputs.spec, inputs.settings)


def defaults_run(run: Path, plan, attempts=(("zero2", 1), ("zero2", 2), ("zero3", 2)), reserved=True) -> Path:
    """A run whose reserved peaks are exactly what dsplan's defaults model for them (the estimate less
    the context, and NCCL beyond one GPU), and whose allocated peaks are the estimate less its overhead;
    host peaks are the host estimate less its page cache.  The ledger is written by dsplan's own code.
    ``reserved=False``: LF logged only the allocated peak."""
    rt = Runtime.default(plan.profile.backend)
    outside = rt.context_bytes + (rt.nccl_bytes if plan.profile.world_size > 1 else 0)
    for n, (tier, mb) in enumerate(attempts, 1):
        est = estimate_at(plan, tier, mb)
        out = run / f"attempt-{n:03d}" / "output"
        out.mkdir(parents=True)
        peaks = {"vram_reserved": (est.gpu_bytes - outside) / GiB if reserved else -1.0,
                 "vram_allocated": (est.gpu_bytes - est.gpu[Component.OVERHEAD]) / GiB}
        (out / "trainer_log.jsonl").write_text(json.dumps({"current_steps": 1, "loss": 1.0, **peaks}) + "\n")
        host = est.host_bytes - est.host.get(HostComponent.CHECKPOINT_CACHE, 0)
        fields = attempt_measurements(est, out / "trainer_log.jsonl", host, "", "success",
                                      plan_assumptions(plan, mb))
        rec = {**end_record(run, n, tier=tier, hardware=hardware_fields(plan.profile), **fields),
               "micro_batch": mb, "grad_accum": 1, "output_dir": str(out)}
        append_attempt(run, rec)
    return run


@pytest.mark.parametrize("gpus", ["1x80G", "8x80G"])
def test_peaks_equal_to_what_the_defaults_model_show_zero_error(tmp_path, gpus):
    plan = _plan(gpus)
    run = defaults_run(tmp_path / "run", plan)
    rep = load_report(run)
    for row in rep.rows:
        assert row.gpu.kind == "max_memory_reserved" and row.gpu.error == pytest.approx(0, abs=1e-6)
        assert row.host.error == pytest.approx(0, abs=1e-9) and row.notes == []
    assert rep.summary()["gpu"]["worst_abs_error_pct"] == 0.0
    r = run_dsplan("report", str(run))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:2] in ("1 ", "2 ", "3 ")]
    assert [(row[8], row[10], row[11]) for row in rows] == [("reserved", row[9], "+0.0%") for row in rows]
    assert "median |error| 0.0%, worst 0.0%" in r.stdout
    # an allocated peak (no reserved one logged), compared with the estimate less its overhead, is exact too
    alloc = load_report(defaults_run(tmp_path / "alloc", plan, reserved=False))
    assert all(r.gpu.kind == "max_memory_allocated" and r.gpu.error == pytest.approx(0, abs=1e-6)
               for r in alloc.rows)


def test_the_oom_bound_and_byte_checks_are_the_same_in_report_and_calibrate(tmp_path):
    """One rule: a record's OOM bound in the report is the lower bound calibrate reads from it."""
    run = tmp_path / "run"
    cases = [{"reserved": g(13.5), "allocated": g(13.1), "tried": g(2.32)},  # reserved + tried
             {"reserved": None, "allocated": g(13.1), "tried": g(2.32)},  # allocated + tried
             {"reserved": g(13.5), "allocated": None, "tried": None},  # reserved only: still a bound
             {"reserved": -5, "allocated": "13 GiB", "tried": 2**60}]  # damaged: no bound
    logged = [{}, {"vram_reserved_bytes": g(16.0)}, {}, {}]
    for n, (fig, meas) in enumerate(zip(cases, logged), 1):
        figures = {**fig, "total": g(15.77), "free": None}
        append_attempt(run, new_record(run, n, "gpu_oom", parts=breakdown(), measured=meas, figures=figures,
                                       hardware=HW, transient=1))
    rows = load_report(run).rows
    bounds = {int(s.where.rsplit(" ", 1)[1]): s.lower_bound for s in read_samples([run]).samples}
    assert [r.gpu.peak for r in rows] == [g(13.5) + g(2.32), g(16.0), g(13.5), None]
    assert bounds == {r.attempt: r.gpu.peak for r in rows if r.gpu.peak is not None}


def test_force_without_plot_is_a_usage_error(measured_run):
    r = run_dsplan("report", str(measured_run), "--force")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "--force goes with --plot" in r.stderr
