"""What an attempt really used, beside what the plan said it would: one record per attempt.

``estimate`` is the plan's figure for the tier and micro-batch the attempt ran.
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


def attempt_measurements(estimate, trainer_log: Path, host_peak: int | None, evidence: str,
                         verdict: str) -> dict:
    """The ``estimate``, ``measured`` and ``oom_figures`` fields of an attempt's end record."""
    from dsplan.codes import OOM_VERDICTS

    est = None
    if estimate is not None:
        est = {"gpu_bytes": estimate.gpu_bytes, "host_bytes": estimate.host_bytes,
               "breakdown": {str(k): v for k, v in estimate.gpu.items()},
               "host_breakdown": {str(k): v for k, v in estimate.host.items()},
               "transient_bytes": estimate.transient_bytes}
    measured = {**vram_peaks(trainer_log), "host_peak_bytes": host_peak}
    figures = oom_figures(evidence) if verdict in OOM_VERDICTS else None
    return {"estimate": est, "measured": measured, "oom_figures": figures}
