"""What an attempt really used, beside what the plan said it would: one record per attempt.

``estimate`` is the plan's figure for the tier and micro-batch the attempt ran, with
what it assumed: the runtime's context and NCCL share (outside PyTorch's caching
allocator, so never in a reserved peak) and the rows' length (:func:`plan_assumptions`).
``measured`` is what LLaMA-Factory logged (``vram_allocated``/``vram_reserved`` in
``trainer_log.jsonl`` when ``RECORD_VRAM=1``, rank 0's peak in GiB; on a CPU it logs 0
and -1, which are no measurement) and the summed
resident high-water mark (``VmHWM``) of the attempt's processes that dsplan saw.
``oom_figures`` are the numbers an OOM message stated.  A figure nobody reported is
None (``null`` in the ledger), never 0.  ``hardware`` (on both of an attempt's lines)
is the plan's hardware profile, so ``dsplan calibrate`` can group measurements by card.
"""

from __future__ import annotations

from pathlib import Path

from dsplan.fsutil import json_objects
from dsplan.logs.figures import oom_figures
from dsplan.units import GiB


class HostPeaks:
    """The largest ``VmHWM`` seen per process; the attempt's host peak is their sum."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}

    def sample(self, pids) -> None:
        for pid in pids:
            hwm = _vm_hwm(pid)
            if hwm is not None and hwm > self.peaks.get(pid, 0):
                self.peaks[pid] = hwm

    def total(self) -> int | None:
        return sum(self.peaks.values()) if self.peaks else None


def _vm_hwm(pid: int) -> int | None:
    """A process's resident high-water mark in bytes, from /proc (None where unreadable)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def vram_peaks(trainer_log: Path) -> dict[str, int | None]:
    """The largest ``vram_allocated``/``vram_reserved`` LLaMA-Factory logged, in bytes (None if never)."""
    best: dict[str, float] = {}
    try:
        data = Path(trainer_log).read_bytes()
    except OSError:
        data = b""
    for rec in json_objects(data.split(b"\n")):
        for key in ("vram_allocated", "vram_reserved"):
            value = rec.get(key)
            # LF logs 0 (and -1 B reserved) when it has no accelerator to ask: not a measurement
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                best[key] = max(best.get(key, 0.0), float(value))
    return {f"{key}_bytes": int(best[key] * GiB) if key in best else None
            for key in ("vram_allocated", "vram_reserved")}


def hardware_fields(profile) -> dict:
    """The ``hardware`` field of an attempt's ledger lines: what its measurements were taken on."""
    return {"backend": profile.backend, "gpu_name": profile.gpu_name, "gpu_mem_bytes": profile.gpu_mem,
            "gpus_per_node": profile.gpus_per_node, "nodes": profile.nodes, "world_size": profile.world_size}


def estimate_fields(estimate, assumed: dict | None = None) -> dict | None:
    """The ledger's ``estimate``: the Estimate's totals, breakdowns and transient memory, plus what
    it assumed (``assumed``, from :func:`plan_assumptions`).  None without an estimate."""
    if estimate is None:
        return None
    transient = getattr(estimate, "transient_bytes", None)
    return {"gpu_bytes": int(estimate.gpu_bytes), "host_bytes": int(estimate.host_bytes),
            "breakdown": {str(k): int(v) for k, v in estimate.gpu.items()},
            "host_breakdown": {str(k): int(v) for k, v in getattr(estimate, "host", {}).items()},
            "transient_bytes": None if transient is None else int(transient), **(assumed or {})}


def plan_assumptions(plan, micro_batch: int) -> dict:
    """What an estimate of ``plan`` at ``micro_batch`` assumed beyond its parts.  The runtime's
    ``context_bytes`` and ``nccl_bytes`` (the latter counted only beyond one GPU) and its
    ``headroom_shift``: the share of ``overhead`` outside PyTorch's caching allocator, which
    ``dsplan report`` and ``calibrate`` take off before comparing with a reserved peak.  And the
    rows: ``seq_len`` (tokens per row), ``tokens`` per micro-batch and ``planned_at``
    (``cutoff_len``, or ``dataset`` when the data's real lengths set them)."""
    from dataclasses import replace

    from dsplan.estimate.estimate import Runtime

    rt = plan.calibration.runtime if plan.calibration is not None else Runtime.default(plan.profile.backend)
    w = replace(plan.workload, micro_batch=micro_batch)
    return {"context_bytes": int(rt.context_bytes), "nccl_bytes": int(rt.nccl_bytes),
            "headroom_shift": rt.headroom_shift, "runtime_source": rt.source, "seq_len": w.seq_len,
            "tokens": w.tokens, "planned_at": "cutoff_len" if w.data_len is None else "dataset"}


def attempt_measurements(estimate, trainer_log: Path, host_peak: int | None, evidence: str,
                         verdict: str, assumed: dict | None = None) -> dict:
    """The ``estimate``, ``measured`` and ``oom_figures`` fields of an attempt's end record
    (``assumed``: :func:`plan_assumptions` of the plan the estimate came from)."""
    from dsplan.codes import OOM_VERDICTS

    measured = {**vram_peaks(trainer_log), "host_peak_bytes": host_peak}
    figures = oom_figures(evidence) if verdict in OOM_VERDICTS else None
    return {"estimate": estimate_fields(estimate, assumed), "measured": measured, "oom_figures": figures}
