"""`dsplan calibrate --from`: samples from run folders and gpu_check files, the fit, the file, and the plan that uses it.

The fake runs are ledgers written by dsplan's own code (``append_attempt`` with the fields
``attempt_measurements`` and ``hardware_fields`` make) for a real plan's estimates; only
the measured peaks are made up, from known "true" coefficients, so the fit has an answer.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsplan.estimate.estimate import CONTEXT_BYTES, SLACK, Runtime
from dsplan.inputs.request import Request, resolve
from dsplan.launch.ledger import append_attempt
from dsplan.launch.loop import Step, _Attempt
from dsplan.launch.measure import (
    attempt_measurements,
    hardware_fields,
    plan_assumptions,
)
from dsplan.learn.calibration import DISAGREE_MEDIAN, load_calibration, predict
from dsplan.learn.samples import FORMAT, card_name, read_samples
from dsplan.plan.planner import estimate_at, make_plan
from dsplan.units import GiB
from tests.conftest import run_dsplan

PLAN_ARGS = ("--gpus", "1x80G", "--gpu-name", "H100", "--model", "Qwen2.5-7B", "--method", "lora")
#: What the fake GPU's caching allocator "really" holds beyond the modelled parts: more than dsplan's defaults
#: (the context is outside the allocator, so a reserved peak never includes it).
TRUE_EXTRA = int(1.25 * GiB)
TRUE_SLACK = {2: 0.40, 3: 0.90}
SUCCESSES = [("zero2", 1), ("zero2", 2), ("zero2", 4), ("zero3", 2), ("zero3", 4)]
OOM_EVIDENCE = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {tried:.2f} GiB. GPU 0 has a total "
                "capacity of 79.19 GiB of which 20.00 MiB is free. Of the allocated memory {alloc:.2f} GiB is "
                "allocated by PyTorch, and {spare:.2f} GiB is reserved by PyTorch but unallocated.")


@pytest.fixture(scope="module")
def plan():
    inputs = resolve(Request(gpus="1x80G", gpu_name="H100", model="Qwen2.5-7B", method="lora"))
    return make_plan(inputs.profile, inputs.spec, inputs.settings)


def true_peak(est, tier: str, extra=TRUE_EXTRA, slack=None) -> int:
    """The reserved peak the fake card shows for this estimate: the modelled parts with the true
    allocator overhead (no context: it is outside PyTorch's caching allocator)."""
    stage = 3 if tier.startswith("zero3") else 2
    base = est.gpu_bytes - est.gpu["overhead"]
    return int(base + extra + (slack or TRUE_SLACK)[stage] * est.transient_bytes)


def write_run(run_dir: Path, plan, attempts: list[dict]) -> Path:
    """A run folder whose ledger has one end record per attempt, as `dsplan run` writes them.
    Each attempt: tier, mb, verdict, and ``reserved`` (bytes, for trainer_log.jsonl) or ``evidence``."""
    for n, a in enumerate(attempts, 1):
        out = run_dir / f"attempt-{n:03d}" / "output"
        out.mkdir(parents=True)
        if a.get("reserved") is not None:
            gib = a["reserved"] / GiB
            lines = [{"current_steps": 1, "vram_allocated": gib * 0.9, "vram_reserved": gib * 0.95},
                     {"current_steps": 2, "vram_allocated": gib * 0.92, "vram_reserved": gib}]
            (out / "trainer_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        est = estimate_at(plan, a["tier"], a["mb"])
        rec = {"attempt": n, "tier": a["tier"], "micro_batch": a["mb"], "grad_accum": 1, "cutoff_len": 2048,
               "started": "2025-01-01T00:00:00+00:00", "ended": "2025-01-01T00:10:00+00:00",
               "exit_code": 0 if a["verdict"] == "success" else 1, "verdict": a["verdict"],
               "evidence": a.get("evidence", ""), "output_dir": str(out),
               "hardware": a.get("hardware", hardware_fields(plan.profile)),
               **attempt_measurements(est, out / "trainer_log.jsonl", 40 * GiB, a.get("evidence", ""),
                                      a["verdict"], plan_assumptions(plan, a["mb"]))}
        append_attempt(run_dir, rec)
    return run_dir


def successes(plan, n=len(SUCCESSES), configs=SUCCESSES, **truth) -> list[dict]:
    return [{"tier": t, "mb": mb, "verdict": "success", "reserved": true_peak(estimate_at(plan, t, mb), t, **truth)}
            for t, mb in configs[:n]]


def oom_attempt(plan, tier: str, mb: int, needed: int) -> dict:
    """A GPU OOM whose message says the step needed ``needed`` bytes (reserved + tried)."""
    tried = 2.0
    reserved = needed / GiB - tried
    return {"tier": tier, "mb": mb, "verdict": "gpu_oom",
            "evidence": OOM_EVIDENCE.format(tried=tried, alloc=reserved - 1.0, spare=1.0)}


def calibrate(cal: Path, *sources, extra=()):
    return run_dsplan("calibrate", *[a for s in sources for a in ("--from", str(s))], *extra,
                      env={"DSPLAN_CALIBRATION": str(cal)})


def entry(cal: Path, key="cuda/H100"):
    return load_calibration(cal).entries[key]


# ------------------------------------------------------------------------ the fit
def test_measured_above_the_estimate_fits_a_larger_context_and_slack(tmp_path, plan):
    run = write_run(tmp_path / "run", plan, successes(plan))
    cal = tmp_path / "cal.json"
    r = calibrate(cal, run)
    assert r.returncode == 0, r.stderr
    e = entry(cal)
    assert e.kind == "fit" and e.runs == 5 and e.measured == 5
    # noise-free samples of both stages: the true coefficients come back
    assert e.runtime.extra_bytes == pytest.approx(TRUE_EXTRA, rel=0.01)
    assert e.runtime.slack[2] == pytest.approx(TRUE_SLACK[2], abs=0.01)
    assert e.runtime.slack[3] == pytest.approx(TRUE_SLACK[3], abs=0.01)
    assert e.runtime.slack[2] > SLACK[2]
    assert e.runtime.context_bytes == CONTEXT_BYTES["cuda"]  # not in a reserved peak: never fitted
    assert e.residuals["before"]["worst"] < -0.01  # the defaults underestimated
    assert e.residuals["after"]["median"] < 0.001
    assert "cuda/H100: 5 samples used (5 measured peaks, 0 OOM bounds), 0 skipped" in r.stdout
    assert "old: context 0.75 GiB" in r.stdout and "(dsplan's defaults)" in r.stdout
    assert "new: context 0.75 GiB, extra 1.25 GiB, allocator slack 40% at ZeRO-2, 90% at ZeRO-3" in r.stdout
    assert f"wrote {cal}" in r.stdout


def test_measured_below_the_estimate_fits_a_smaller_overhead(tmp_path, plan):
    run = write_run(tmp_path / "run", plan, successes(plan, n=3, extra=int(0.25 * GiB), slack={2: 0.05, 3: 0.5}))
    cal = tmp_path / "cal.json"
    assert calibrate(cal, run).returncode == 0
    e = entry(cal)
    assert e.kind == "fit"
    assert e.runtime.extra_bytes == pytest.approx(0.25 * GiB, rel=0.02)
    assert e.runtime.slack[2] == pytest.approx(0.05, abs=0.01)
    assert e.runtime.slack[3] == SLACK[3]  # no ZeRO-3 sample: the default stays
    assert e.residuals["before"]["worst"] > 0  # the defaults overestimated


def test_an_oom_lower_bound_raises_the_context(tmp_path, plan):
    ok = write_run(tmp_path / "ok", plan, successes(plan, n=3))
    cal_ok = tmp_path / "ok.json"
    assert calibrate(cal_ok, ok).returncode == 0
    fitted = entry(cal_ok).runtime
    # zero2 at micro-batch 8 died needing 3 GiB more than the fit from the successes predicts
    est = estimate_at(plan, "zero2", 8)
    base = est.gpu_bytes - est.gpu["overhead"]
    needed = int(base + fitted.extra_bytes + fitted.slack[2] * est.transient_bytes + 3 * GiB)
    oom = write_run(tmp_path / "oom", plan, [oom_attempt(plan, "zero2", 8, needed)])
    cal = tmp_path / "both.json"
    r = calibrate(cal, ok, oom)
    assert r.returncode == 0, r.stderr
    e = entry(cal)
    assert e.oom_bounds == 1 and e.runs == 4
    assert e.runtime.extra_bytes == pytest.approx(fitted.extra_bytes + 3 * GiB, rel=0.01)
    [bound] = [s for s in read_samples([oom]).samples]
    assert bound.lower_bound == pytest.approx(needed, rel=0.001)
    assert predict(bound, e.runtime) >= bound.lower_bound
    assert "OOM bounds: the old coefficients predicted 1 of 1 below the memory the OOM needed, the new 0" in r.stdout


def test_fewer_than_three_runs_only_shift_the_headroom_and_say_so(tmp_path, plan):
    est = estimate_at(plan, "zero2", 1)
    allocator_share = est.gpu_bytes - CONTEXT_BYTES["cuda"]  # what the estimate says the allocator reserves
    run = write_run(tmp_path / "run", plan, [{"tier": "zero2", "mb": 1, "verdict": "success",
                                              "reserved": int(allocator_share * 1.10)}])
    cal = tmp_path / "cal.json"
    r = calibrate(cal, run, extra=("--site", "lab-7"))
    assert r.returncode == 0, r.stderr
    e = entry(cal)
    assert e.kind == "headroom" and e.runs == 1 and e.site == "lab-7"
    assert e.runtime.headroom_shift == pytest.approx(0.10, abs=0.002)
    assert e.runtime.context_bytes == CONTEXT_BYTES["cuda"] and e.runtime.slack == SLACK
    assert "headroom only: 1 measured peak, a fit needs 3; every GPU estimate for cuda/H100 is raised 10.0%" in r.stdout
    # the shifted estimate covers the measured peak
    assert e.residuals["after"]["worst"] == pytest.approx(0.0, abs=0.002)


def test_a_new_card_merges_into_the_file_and_the_same_card_replaces_its_entry(tmp_path, plan):
    cal = tmp_path / "cal.json"
    a100 = dict(hardware_fields(plan.profile), gpu_name="NVIDIA A100-SXM4-80GB")
    attempts = [dict(a, hardware=a100) for a in successes(plan, n=3)]
    assert calibrate(cal, write_run(tmp_path / "a100", plan, attempts)).returncode == 0
    assert calibrate(cal, write_run(tmp_path / "h100", plan, successes(plan, n=1))).returncode == 0
    assert sorted(load_calibration(cal).entries) == ["cuda/A100", "cuda/H100"]
    assert entry(cal).kind == "headroom"
    r = calibrate(cal, tmp_path / "h100", tmp_path / "a100")  # A100's samples do not count for H100
    assert r.returncode == 0
    assert entry(cal).runs == 1 and entry(cal, "cuda/A100").runs == 3
    assert "old: context 0.75 GiB, extra 0.00 GiB, allocator slack 15% at ZeRO-2, 50% at ZeRO-3, headroom shift" in r.stdout


def test_peaks_equal_to_what_the_defaults_model_fit_the_defaults_back(tmp_path, plan):
    """Reserved peaks exactly as dsplan's defaults model them (estimate - context): 0 % error before,
    and the fit returns the defaults (extra 0, slack 15 % / 50 %)."""
    run = write_run(tmp_path / "run", plan, successes(plan, extra=0, slack=SLACK))
    cal = tmp_path / "cal.json"
    r = calibrate(cal, run)
    assert r.returncode == 0, r.stderr
    e = entry(cal)
    assert e.residuals["before"]["median"] == pytest.approx(0, abs=1e-6)
    assert e.residuals["before"]["worst"] == pytest.approx(0, abs=1e-6)
    assert e.runtime.extra_bytes < 0.001 * GiB and e.fitted_stages == (2, 3)
    assert e.runtime.slack[2] == pytest.approx(SLACK[2], abs=1e-3)
    assert e.runtime.slack[3] == pytest.approx(SLACK[3], abs=1e-3)
    assert "error vs measured peaks: median 0.0% -> 0.0%, worst 0.0% -> 0.0%" in r.stdout
    assert e.warning is None and "WARNING" not in r.stdout


def test_one_configuration_three_times_fits_extra_only_and_says_so(tmp_path, plan):
    """The same transient memory three times: slack and extra are one unknown, so only extra is fitted."""
    run = write_run(tmp_path / "run", plan, successes(plan, configs=[("zero2", 2)] * 3))
    cal = tmp_path / "cal.json"
    r = calibrate(cal, run, extra=("--json",))
    assert r.returncode == 0, r.stderr
    [res] = json.loads(r.stdout)["results"]
    assert res["kind"] == "fit" and res["fitted_stages"] == []
    e = entry(cal)
    assert e.fitted_stages == () and e.runtime.slack == SLACK  # slack kept; extra absorbs the difference
    est = estimate_at(plan, "zero2", 2)
    assert e.runtime.extra_bytes == pytest.approx(TRUE_EXTRA + (TRUE_SLACK[2] - SLACK[2]) * est.transient_bytes,
                                                  rel=0.01)
    assert e.residuals["after"]["median"] < 0.001
    text = calibrate(tmp_path / "cal2.json", run).stdout
    assert ("fit: extra only by least squares (the context is outside the measured allocator peaks and keeps its "
            "value); slack kept at dsplan's default for ZeRO-2 (its runs do not separate slack from extra), "
            "ZeRO-3 (no runs)") in text
    assert "allocator slack of" not in text


def test_a_stage_with_one_transient_size_keeps_its_slack(tmp_path, plan):
    configs = [("zero2", 1), ("zero2", 2), ("zero2", 4), ("zero3", 2), ("zero3", 2)]
    run = write_run(tmp_path / "run", plan, successes(plan, configs=configs))
    cal = tmp_path / "cal.json"
    r = calibrate(cal, run)
    assert r.returncode == 0, r.stderr
    e = entry(cal)
    assert e.fitted_stages == (2,) and e.runtime.slack[3] == SLACK[3]
    assert "fit: extra and the allocator slack of ZeRO-2 by least squares" in r.stdout
    assert "ZeRO-3 (its runs do not separate slack from extra)" in r.stdout


def test_few_new_runs_check_an_earlier_fit_instead_of_replacing_it(tmp_path, plan):
    cal = tmp_path / "cal.json"
    assert calibrate(cal, write_run(tmp_path / "fit", plan, successes(plan)), extra=("--site", "lab-7")).returncode == 0
    fitted = entry(cal)
    assert fitted.kind == "fit" and fitted.runs == 5
    # one new run needs 10 % more than the fit predicts
    est = estimate_at(plan, "zero2", 8)
    needed = predict(_sample_of(tmp_path, plan, "zero2", 8), fitted.runtime) * 1.10
    r = calibrate(cal, write_run(tmp_path / "new", plan, [{"tier": "zero2", "mb": 8, "verdict": "success",
                                                           "reserved": int(needed)}]))
    assert r.returncode == 0, r.stderr
    e = entry(cal)
    assert e.kind == "fit" and e.runs == 6 and e.measured == 6 and e.site == "lab-7"
    assert e.fitted_stages == fitted.fitted_stages
    assert (e.runtime.extra_bytes, e.runtime.slack) == (fitted.runtime.extra_bytes, fitted.runtime.slack)
    assert e.runtime.headroom_shift == pytest.approx(0.10, abs=0.002)
    assert e.residuals["after"]["worst"] == pytest.approx(0.0, abs=0.002)
    assert any(str(tmp_path / "fit") in src for src in e.sources) and any(str(tmp_path / "new") in src
                                                                          for src in e.sources)
    assert ("kept the fit of the earlier entry (5 runs): 1 measured peak cannot refit it (a fit needs 3), so the fit "
            "was only checked against them: headroom shift 0.0% -> 10.0% on top of the fitted coefficients") in r.stdout
    assert "headroom only" not in r.stdout
    assert est.gpu_bytes > 0


def _sample_of(tmp_path, plan, tier, mb):
    """The sample a success at this tier and micro-batch reads as (its measured peak is made up)."""
    run = write_run(tmp_path / f"probe-{tier}-{mb}", plan, [{"tier": tier, "mb": mb, "verdict": "success",
                                                           "reserved": GiB}])
    return read_samples([run]).samples[0]


def test_runs_the_model_cannot_fit_are_written_with_a_loud_warning(tmp_path, plan):
    """Peaks half the modelled parts: no extra or slack (both >= 0) can fit them."""
    attempts = successes(plan, n=3)
    for a in attempts:
        est = estimate_at(plan, a["tier"], a["mb"])
        a["reserved"] = int((est.gpu_bytes - est.gpu["overhead"]) * 0.5)
    cal = tmp_path / "cal.json"
    r = calibrate(cal, write_run(tmp_path / "run", plan, attempts))
    assert r.returncode == 0, r.stderr
    e = entry(cal)
    assert e.residuals["after"]["median"] > DISAGREE_MEDIAN
    assert e.warning.startswith("the runs disagree with the model: median |error| 100% after calibrating")
    assert "3 of 3 estimates sized every row at cutoff_len" in e.warning and "--dataset" in e.warning
    assert "  WARNING: the runs disagree with the model" in r.stdout and "the entry was written anyway" in r.stdout
    plan_out = run_dsplan("plan", *PLAN_ARGS, env={"DSPLAN_CALIBRATION": str(cal)}).stdout
    assert "WARNING: the runs disagree with the model" in plan_out


def test_the_same_ledger_named_twice_is_read_once(tmp_path, plan):
    run = write_run(tmp_path / "run", plan, successes(plan, n=3))
    (tmp_path / "link").symlink_to(run)
    found = read_samples([run, run / "attempts.jsonl", tmp_path / "link", tmp_path / "link" / "attempts.jsonl"])
    assert len(found.samples) == 3 and found.sources == [str(run)]
    r = calibrate(tmp_path / "cal.json", run, run / "attempts.jsonl")
    assert r.returncode == 0 and entry(tmp_path / "cal.json").runs == 3


def test_a_plan_without_gpu_name_names_the_cards_the_file_has(tmp_path, plan):
    cal = tmp_path / "cal.json"
    assert calibrate(cal, write_run(tmp_path / "run", plan, successes(plan, n=3))).returncode == 0
    env = {"DSPLAN_CALIBRATION": str(cal)}
    no_name = [a for a in PLAN_ARGS if a not in ("--gpu-name", "H100")]
    got = json.loads(run_dsplan("plan", *no_name, "--json", env=env).stdout)
    assert got["calibration"] is None
    line = next(w for w in got["why"] if w.startswith("runtime overhead uncalibrated"))
    assert (f"{cal} has calibrations for cuda/H100 but none for this card (the plan has no --gpu-name); if the "
            "GPUs are one of those, pass --gpu-name (e.g. --gpu-name H100) to use its calibration") in line
    other = json.loads(run_dsplan("plan", *PLAN_ARGS[:2], "--gpu-name", "A100", *PLAN_ARGS[4:], "--json",
                                  env=env).stdout)
    assert any("none for this card (this plan's card is A100)" in w for w in other["why"])
    rocm = json.loads(run_dsplan("plan", *no_name, "--backend", "rocm", "--json", env=env).stdout)
    assert not any("has calibrations" in w for w in rocm["why"])  # another backend's entries are no hint


# ------------------------------------------------------------------------ what is not a sample
def test_cpu_runs_and_other_failures_are_skipped_with_a_reason_and_none_usable_is_exit_2(tmp_path, plan):
    run = write_run(tmp_path / "run", plan, [
        {"tier": "zero2", "mb": 1, "verdict": "success"},  # a CPU run: LF logged no vram
        {"tier": "zero2", "mb": 1, "verdict": "not_oom"},
        {"tier": "zero2", "mb": 1, "verdict": "gpu_oom", "evidence": "CUDA error: out of memory"},  # no figures
    ])
    found = read_samples([run])
    assert found.samples == []
    reasons = found.skip_reasons("cuda/H100")
    assert reasons["no GPU peak measured (a CPU run, or RECORD_VRAM=0)"] == 1
    assert reasons["GPU OOM whose message states no reserved or allocated figure, and no logged peak"] == 1
    assert sum(reasons.values()) == 3
    cal = tmp_path / "cal.json"
    r = calibrate(cal, run)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no usable calibration sample" in r.stderr and "no GPU peak measured" in r.stderr
    assert not cal.exists()


def test_a_source_that_does_not_exist_and_a_bad_site_are_one_line(tmp_path):
    r = calibrate(tmp_path / "cal.json", tmp_path / "missing")
    assert r.returncode == 2 and "no such file or folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = calibrate(tmp_path / "cal.json", tmp_path, extra=("--site", "a b\nc"))
    assert r.returncode == 2 and "bad --site" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_card_names_are_normalized():
    assert card_name("NVIDIA A100-SXM4-80GB") == "A100"
    assert card_name("K100_AI") == "K100"
    assert card_name("Some New-Card 9") == "somenewcard9"
    assert card_name(None) == card_name("") == "unknown"


# ------------------------------------------------------------------------ gpu_check's sample files
def test_gpu_check_samples_round_trip(tmp_path, plan):
    """Records in scripts/gpu_check.py's format read back as the samples they describe."""
    path = tmp_path / "gpu_check.jsonl"
    lines, peaks = [], []
    for tier, mb in SUCCESSES:
        est = estimate_at(plan, tier, mb)
        peaks.append(true_peak(est, tier))
        lines.append({
            "format": FORMAT, "source": "gpu_check",
            "hardware": {"backend": "cuda", "gpu_name": "H200", "gpu_mem_bytes": 150323855360, "world_size": 1,
                         "nodes": 1, "gpus_per_node": 1},
            "tier": tier, "micro_batch": mb, "cutoff_len": 1024, "verdict": "success",
            "estimate": {"gpu_bytes": est.gpu_bytes, "host_bytes": est.host_bytes,
                         "breakdown": {str(k): v for k, v in est.gpu.items()},
                         "transient_bytes": est.transient_bytes},
            "measured": {"vram_allocated_bytes": peaks[-1] - GiB, "vram_reserved_bytes": peaks[-1],
                         "host_peak_bytes": None},
            "oom_figures": None, "case": {"model": "Qwen2.5-7B", "gc": True}})
    text = "".join(json.dumps(x) + "\n" for x in lines) + "{cut short\n" + json.dumps({"format": "other/9"}) + "\n"
    path.write_text(text)
    found = read_samples([path])
    assert [(s.key, s.stage, s.measured_bytes) for s in found.samples] == [
        ("cuda/H200", 3 if t == "zero3" else 2, p) for (t, _), p in zip(SUCCESSES, peaks)]
    assert [s.gpu_bytes - s.base_bytes for s in found.samples] == [x["estimate"]["breakdown"]["overhead"]
                                                                    for x in lines]
    assert sorted(found.skip_reasons()) == ["not a JSON object", "not a dsplan-sample/1 record (format 'other/9')"]
    cal = tmp_path / "cal.json"
    r = calibrate(cal, path)
    assert r.returncode == 0, r.stderr
    assert entry(cal, "cuda/H200").runtime.extra_bytes == pytest.approx(TRUE_EXTRA, rel=0.01)
    assert "skipped, not counted for a card: 2" in r.stdout


# ------------------------------------------------------------------------ the plan that uses it
def test_plan_names_the_calibration_file_and_its_runs(tmp_path, plan):
    cal = tmp_path / "cal.json"
    assert calibrate(cal, write_run(tmp_path / "run", plan, successes(plan))).returncode == 0
    env = {"DSPLAN_CALIBRATION": str(cal)}
    r = run_dsplan("plan", *PLAN_ARGS, env=env)
    assert r.returncode == 0, r.stderr
    assert f"runtime overhead calibrated for cuda/H100 from 5 runs in {cal}" in r.stdout
    calibrated = json.loads(run_dsplan("plan", *PLAN_ARGS, "--json", env=env).stdout)
    assert calibrated["calibration"]["path"] == str(cal)
    assert {k: calibrated["calibration"][k] for k in ("backend", "card", "kind", "runs")} == {
        "backend": "cuda", "card": "H100", "kind": "fit", "runs": 5}
    default = json.loads(run_dsplan("plan", *PLAN_ARGS, "--json",
                                    env={"DSPLAN_CALIBRATION": str(tmp_path / "none.json")}).stdout)
    assert default["calibration"] is None
    for c, d in zip(calibrated["tiers"], default["tiers"]):  # more overhead on every tier, nothing else moved
        assert c["breakdown"]["overhead"] > d["breakdown"]["overhead"]
        assert c["gpu_bytes"] - c["breakdown"]["overhead"] == d["gpu_bytes"] - d["breakdown"]["overhead"]
    other = json.loads(run_dsplan("plan", *PLAN_ARGS[:2], "--gpu-name", "A100", *PLAN_ARGS[4:], "--json",
                                  env=env).stdout)
    assert other["calibration"] is None  # an H100 calibration says nothing about an A100


def test_a_headroom_calibration_raises_every_gpu_estimate(tmp_path, plan):
    est = estimate_at(plan, "zero2", 1)
    cal = tmp_path / "cal.json"
    allocator_share = est.gpu_bytes - CONTEXT_BYTES["cuda"]
    run = write_run(tmp_path / "run", plan, [{"tier": "zero2", "mb": 1, "verdict": "success",
                                              "reserved": int(allocator_share * 1.2)}])
    assert calibrate(cal, run).returncode == 0
    r = run_dsplan("plan", *PLAN_ARGS, "--json", env={"DSPLAN_CALIBRATION": str(cal)})
    got = json.loads(r.stdout)
    assert got["calibration"]["kind"] == "headroom" and got["calibration"]["runs"] == 1
    assert got["tiers"][0]["gpu_bytes"] == pytest.approx(est.gpu_bytes * 1.2, rel=0.002)
    assert any("headroom only, every GPU estimate raised 20.0%" in line for line in got["why"])


def test_no_calibration_file_says_the_overhead_is_uncalibrated(tmp_path):
    r = run_dsplan("plan", *PLAN_ARGS, env={"DSPLAN_CALIBRATION": str(tmp_path / "absent.json")})
    assert r.returncode == 0, r.stderr
    assert "runtime overhead uncalibrated: dsplan's defaults for cuda" in r.stdout
    assert not (tmp_path / "absent.json").exists()


@pytest.mark.parametrize("text, says", [
    ("{not json", "not readable JSON"),
    (json.dumps({"format": "dsplan-calibration", "version": 7, "entries": {}}), "version 7 is not 1"),
    (json.dumps({"format": "dsplan-calibration", "version": 1, "entries": {"cuda/H100": {
        "backend": "cuda", "card": "H100", "kind": "fit", "context_bytes": 1, "nccl_bytes": 1,
        "slack": {"2": -1, "3": 0.5}, "headroom_shift": 0, "runs": 3}}}), "slack: 2 must be a number from 0 to 2"),
])
def test_a_malformed_calibration_file_is_one_line_exit_2_naming_it(tmp_path, plan, text, says):
    cal = tmp_path / "cal.json"
    cal.write_text(text)
    r = run_dsplan("plan", *PLAN_ARGS, env={"DSPLAN_CALIBRATION": str(cal)})
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and str(cal) in r.stderr and says in r.stderr
    run = write_run(tmp_path / "run", plan, successes(plan, n=1))
    r = calibrate(cal, run)  # nor is it overwritten by a calibration
    assert r.returncode == 2 and cal.read_text() == text


def test_the_xdg_config_folder_holds_the_file_by_default(tmp_path, plan, monkeypatch):
    monkeypatch.delenv("DSPLAN_CALIBRATION", raising=False)
    run = write_run(tmp_path / "run", plan, successes(plan, n=1))
    r = run_dsplan("calibrate", "--from", str(run), env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cfg" / "dsplan" / "calibration.json").is_file()


# ------------------------------------------------------------------------ what dsplan run records
def test_the_attempts_lines_carry_the_hardware_and_the_transient_bytes(tmp_path, plan):
    a = _Attempt({"number": 1, "output_dir": tmp_path}, Step("zero2", 1, 1), 2048, None,
                 estimate=estimate_at(plan, "zero2", 1), hardware=hardware_fields(plan.profile))
    assert a.fields()["hardware"] == {"backend": "cuda", "gpu_name": "H100", "gpu_mem_bytes": 80 * GiB,
                                      "gpus_per_node": 1, "nodes": 1, "world_size": 1}
    m = attempt_measurements(a.estimate, tmp_path / "none.jsonl", None, "", "success")
    assert m["estimate"]["transient_bytes"] == a.estimate.transient_bytes > 0
    # the overhead is the defaults' function of it: context + slack x transient (one GPU, no NCCL)
    assert m["estimate"]["breakdown"]["overhead"] == pytest.approx(
        Runtime.default("cuda").overhead(2, a.estimate.transient_bytes, 1), abs=1)


def test_calibrate_never_imports_the_training_stack(tmp_path, plan):
    run = write_run(tmp_path / "run", plan, successes(plan, n=3))
    code = ("import sys, atexit\n"
            "atexit.register(lambda: sys.stderr.write('HEAVY:' + ','.join(m for m in ('torch', 'deepspeed', "
            "'llamafactory', 'transformers') if m in sys.modules) + '\\n'))\n"
            "from dsplan.cli import cli\n"
            f"cli.main(['calibrate', '--from', {str(run)!r}], prog_name='dsplan')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, DSPLAN_CALIBRATION=str(tmp_path / "cal.json")))
    assert r.returncode == 0, r.stderr
    assert "HEAVY:\n" in r.stderr and (tmp_path / "cal.json").is_file()
