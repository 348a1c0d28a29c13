"""Every attempt records the plan's estimate beside what was measured, and the figures an OOM stated."""

import json

import pytest

from dsplan.launch.measure import HostPeaks, vram_peaks
from dsplan.logs.figures import oom_figures
from dsplan.units import GiB, MiB

CUDA_NEW = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total capacity of "
            "79.15 GiB of which 1.02 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory "
            "in use. Of the allocated memory 75.30 GiB is allocated by PyTorch, and 1.20 GiB is reserved by PyTorch "
            "but unallocated.")
CUDA_OLD = ("RuntimeError: CUDA out of memory. Tried to allocate 2.32 GiB (GPU 0; 15.77 GiB total capacity; "
            "13.10 GiB already allocated; 1.02 GiB free; 13.50 GiB reserved in total by PyTorch)")
NPU = ("RuntimeError: NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 60.97 GiB total capacity; 56.84 GiB "
       "already allocated; 56.84 GiB current active; 1.24 GiB free; 57.56 GiB reserved in total by PyTorch.)")
CPU = ("RuntimeError: [enforce fail at alloc_cpu.cpp:124] err == 0. DefaultCPUAllocator: can't allocate memory: "
       "you tried to allocate 536870912 bytes. Error code 12 (Cannot allocate memory)")


def g(x: float) -> int:
    return int(x * GiB)


@pytest.mark.parametrize("text,want", [
    (CUDA_NEW, {"tried": g(2.32), "total": g(79.15), "free": g(1.02), "allocated": g(75.30),
                "reserved": g(75.30) + g(1.20)}),
    (CUDA_OLD, {"tried": g(2.32), "total": g(15.77), "allocated": g(13.10), "free": g(1.02), "reserved": g(13.50)}),
    (CUDA_NEW.replace("CUDA", "HIP"), {"tried": g(2.32), "total": g(79.15)}),
    (NPU, {"tried": g(2.00), "total": g(60.97), "allocated": g(56.84), "reserved": g(57.56), "free": g(1.24)}),
    (CPU, {"tried": 512 * MiB, "total": None, "allocated": None, "reserved": None}),
    ("Killed", {"tried": None, "total": None}),
])
def test_oom_figures(text, want):
    got = oom_figures(text)
    assert set(got) == {"tried", "allocated", "reserved", "total", "free"}
    for key, value in want.items():
        assert got[key] == value, key


def test_vram_peaks_are_the_largest_logged_and_none_when_never_logged(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    assert vram_peaks(log) == {"vram_allocated_bytes": None, "vram_reserved_bytes": None}
    log.write_text("\n".join(json.dumps(r) for r in (
        {"current_steps": 1, "vram_allocated": 10.5, "vram_reserved": 12.0},
        {"current_steps": 2, "vram_allocated": 11.25, "vram_reserved": 11.0},
        {"current_steps": 3, "loss": 1.0},
        {"current_steps": 4, "vram_allocated": 0.0, "vram_reserved": -0.0},  # LF on a CPU
    )) + "\n{half a line")
    assert vram_peaks(log) == {"vram_allocated_bytes": g(11.25), "vram_reserved_bytes": g(12.0)}
    log.write_text(json.dumps({"current_steps": 1, "vram_allocated": 0.0, "vram_reserved": -0.0}) + "\n")
    assert vram_peaks(log) == {"vram_allocated_bytes": None, "vram_reserved_bytes": None}


def test_host_peaks_sum_each_processes_high_water_mark():
    import os

    peaks = HostPeaks()
    assert peaks.total() is None
    peaks.sample([os.getpid(), 999_999_999])  # a pid that does not exist is skipped
    mine = peaks.total()
    assert mine is not None and mine > 10 * MiB
    peaks.sample([os.getpid()])
    assert peaks.total() >= mine


def test_the_ledger_estimate_records_what_it_assumed():
    """The context and NCCL share (outside PyTorch's allocator) and the rows' length, for report and calibrate."""
    from dataclasses import replace

    from dsplan.estimate.estimate import Runtime
    from dsplan.inputs.request import Request, resolve
    from dsplan.launch.measure import attempt_measurements, plan_assumptions
    from dsplan.plan.planner import estimate_at, make_plan

    inputs = resolve(Request(gpus="8x80G", gpu_name="H100", model="Qwen2.5-7B", method="lora"))
    plan = make_plan(inputs.profile, inputs.spec, inputs.settings)
    default = Runtime.default("cuda")
    got = plan_assumptions(plan, 4)
    assert got == {"context_bytes": default.context_bytes, "nccl_bytes": default.nccl_bytes, "headroom_shift": 0.0,
                   "runtime_source": "default", "seq_len": plan.settings.cutoff_len,
                   "tokens": 4 * plan.settings.cutoff_len, "planned_at": "cutoff_len"}
    est = estimate_at(plan, "zero2", 4)
    fields = attempt_measurements(est, "/nonexistent/trainer_log.jsonl", None, "", "success", got)["estimate"]
    assert fields["gpu_bytes"] == est.gpu_bytes and fields["transient_bytes"] == est.transient_bytes
    assert {k: fields[k] for k in got} == got and fields["host_breakdown"]["checkpoint_cache"] > 0
    # a calibrated plan records the calibration's coefficients, not the defaults
    entry = type("Entry", (), {"runtime": replace(default, context_bytes=GiB, headroom_shift=0.1, source="cal.json")})
    plan.calibration = entry
    mine = plan_assumptions(plan, 1)
    assert (mine["context_bytes"], mine["headroom_shift"], mine["runtime_source"]) == (GiB, 0.1, "cal.json")
    assert attempt_measurements(None, "/nonexistent", None, "", "not_oom", mine)["estimate"] is None
