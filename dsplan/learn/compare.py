"""Which part of dsplan's GPU estimate a measured figure can be held against: one rule for every comparison.

A measured GPU figure comes from one of three places, and each sees a different share
of what dsplan's estimate counts:

- **the process's total on the card** (``nvidia-smi``, or a run that died because the
  card was full): everything, CUDA/HIP context included.  Compared with the whole
  estimate (``gpu_bytes``).  A source that does not say how it measured is taken as this.
- **PyTorch's caching allocator, reserved** (``torch.cuda.max_memory_reserved``, LF's
  ``vram_reserved`` under ``RECORD_VRAM=1``, and an OOM message's reserved / allocated /
  tried figures): the context and libraries and NCCL's buffers are not allocated through
  it.  Compared with the estimate less ``context_bytes`` and, on more than one GPU,
  ``nccl_bytes`` -- the part of the ``overhead`` component that lives outside the
  allocator (:class:`dsplan.estimate.estimate.Runtime`); a headroom shift raised those
  two with everything else, so they are taken off raised alike.
- **PyTorch's caching allocator, allocated** (``max_memory_allocated``, LF's
  ``vram_allocated``): live tensors, without the allocator's slack either.  Compared
  with the estimate less its whole ``overhead`` component.

An OOM message's figures bound the demand from below at the allocator's level: the
step needed at least what was reserved (or, unstated, allocated) when it failed plus
the allocation that failed (:func:`oom_bound`).

Also here: the host side (the summed ``VmHWM`` of the ranks is resident memory only,
so the page cache dsplan counts for reading checkpoints is left out of the estimate
it is compared with), and the one check of a byte count read from a ledger or a sample
file (:func:`nbytes`).  Standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dsplan.codes import Component, HostComponent
from dsplan.estimate.estimate import Runtime
from dsplan.units import GiB

#: The measurement kinds, as ``tests/data/public_peaks.yaml`` names them.
TOTAL = "nvidia-smi"
UNSPECIFIED = "unspecified"
RESERVED = "max_memory_reserved"
ALLOCATED = "max_memory_allocated"
OOM_CARD = "oom_lower_bound"  # died on a full card: the process total exceeded its capacity
OOM_BOUND = "oom_bound"  # an OOM's lower bound from the allocator's own figures (:func:`oom_bound`)
#: The kinds a public figure can have.
PUBLIC_KINDS = (TOTAL, UNSPECIFIED, RESERVED, ALLOCATED, OOM_CARD)
#: Kinds measured at the process level (context included).
PROCESS_KINDS = (TOTAL, UNSPECIFIED, OOM_CARD)
#: Kinds measured inside PyTorch's caching allocator, its slack included.
ALLOCATOR_KINDS = (RESERVED, OOM_BOUND)
#: What the estimate is compared with, per kind, in words (for labels).
COMPARED_AS = {TOTAL: "whole estimate", UNSPECIFIED: "whole estimate", OOM_CARD: "whole estimate",
               RESERVED: "estimate - context - NCCL", OOM_BOUND: "estimate - context - NCCL",
               ALLOCATED: "estimate - overhead"}
#: Short names for tables.
SHORT = {TOTAL: "smi", UNSPECIFIED: "smi?", RESERVED: "reserved", ALLOCATED: "allocated", OOM_CARD: "OOM>card",
         OOM_BOUND: "OOM bound"}
#: Host parts that are page cache (file pages read once), never in a process's resident set.
PAGE_CACHE = frozenset({HostComponent.CHECKPOINT_CACHE})
#: Sizes above this are not memory (and not JSON's exact integers).
MAX_SIZE = 2**53


def nbytes(value: Any) -> int | None:
    """A byte count from JSON: a finite number from 0 to :data:`MAX_SIZE`, else None (absent or damaged)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or not 0 <= value < MAX_SIZE:
        return None
    return int(value)


@dataclass(frozen=True)
class GpuFigures:
    """An estimate's per-GPU figures that a comparison needs.  ``outside_bytes``: the part of
    ``overhead`` that is not in PyTorch's caching allocator (context, NCCL beyond one GPU)."""

    gpu_bytes: float
    overhead_bytes: float
    outside_bytes: float

    def comparable(self, kind: str) -> float:
        """The estimate's figure for a measurement of ``kind`` (see the module docstring)."""
        if kind in PROCESS_KINDS:
            return self.gpu_bytes
        if kind in ALLOCATOR_KINDS:
            return self.gpu_bytes - self.outside_bytes
        if kind == ALLOCATED:
            return self.gpu_bytes - self.overhead_bytes
        raise ValueError(f"unknown measurement kind {kind!r}")


def outside_allocator(context: float, nccl: float, world_size: int, headroom_shift: float = 0.0) -> float:
    """Context and NCCL buffers (NCCL only beyond one GPU), raised by the headroom shift as the estimate was."""
    return (context + (nccl if world_size > 1 else 0.0)) * (1.0 + headroom_shift)


def with_runtime(base: float, stage: int, transient: float, world_size: int, rt: Runtime) -> GpuFigures:
    """The figures an estimate whose non-overhead parts sum to ``base`` has under ``rt``'s overhead."""
    overhead = rt.overhead(stage, transient, world_size, rest=base)
    return GpuFigures(base + overhead, overhead,
                      outside_allocator(rt.context_bytes, rt.nccl_bytes, world_size, rt.headroom_shift))


def of_estimate(est, world_size: int, rt: Runtime) -> GpuFigures:
    """The figures of an :class:`~dsplan.estimate.estimate.Estimate` made with ``rt``."""
    return GpuFigures(float(est.gpu_bytes), float(est.gpu.get(Component.OVERHEAD, 0)),
                      outside_allocator(rt.context_bytes, rt.nccl_bytes, world_size, rt.headroom_shift))


def _world_size(hardware: Any) -> int:
    ws = hardware.get("world_size") if isinstance(hardware, dict) else None
    return ws if isinstance(ws, int) and not isinstance(ws, bool) and ws >= 1 else 1


def recorded(est: Any, hardware: Any) -> tuple[GpuFigures | None, str | None]:
    """The figures of a ledger's (or a sample line's) ``estimate`` dict and ``hardware``, and a note
    when the context was not recorded and the backend's default was assumed (a ledger from an older
    dsplan).  (None, None) without ``gpu_bytes``."""
    est = est if isinstance(est, dict) else {}
    breakdown = est.get("breakdown") if isinstance(est.get("breakdown"), dict) else {}
    parts = [n for n in (nbytes(v) for v in breakdown.values()) if n is not None]
    gpu = nbytes(est.get("gpu_bytes"))
    gpu = gpu if gpu is not None else (sum(parts) if parts else None)
    if gpu is None:
        return None, None
    overhead = nbytes(breakdown.get(str(Component.OVERHEAD))) or 0
    world = _world_size(hardware)
    context, nccl = nbytes(est.get("context_bytes")), nbytes(est.get("nccl_bytes"))
    shift = est.get("headroom_shift")
    numeric = isinstance(shift, (int, float)) and not isinstance(shift, bool)
    shift = float(shift) if numeric and 0 <= shift <= 10 else 0.0
    if context is not None and nccl is not None:
        return GpuFigures(gpu, overhead, outside_allocator(context, nccl, world, shift)), None
    backend = hardware.get("backend") if isinstance(hardware, dict) else None
    note_backend = backend if backend in ("cuda", "rocm", "dcu") else "cuda"
    default = Runtime.default(note_backend)
    note = (f"context not recorded (an older dsplan): dsplan's default for {note_backend} assumed "
            f"({default.context_bytes / GiB:.2f} GiB" + (f", NCCL {default.nccl_bytes / GiB:.2f} GiB" if world > 1
                                                          else "") + ")"
            + ("" if backend == note_backend else f"; backend {'unknown' if backend is None else 'not recognized'}"))
    return GpuFigures(gpu, overhead, outside_allocator(default.context_bytes, default.nccl_bytes, world)), note


def oom_bound(figures: Any, measured: Any = None) -> tuple[int, str] | None:
    """A GPU OOM's lower bound on the step's demand at the caching allocator's level, and where it
    came from: the larger of the message's reserved (else allocated) + tried (``oom_figures``; tried
    counts 0 when unstated) and a peak logged before the failure (``vram_reserved``, else
    ``vram_allocated``; reserved >= allocated, so either bounds it).  None without any."""
    figures = figures if isinstance(figures, dict) else {}
    measured = measured if isinstance(measured, dict) else {}
    held = nbytes(figures.get("reserved")) or nbytes(figures.get("allocated"))
    tried = nbytes(figures.get("tried")) or 0
    candidates = [(held + tried, "oom_figures")] if held else []
    for key, name in (("vram_reserved_bytes", "vram_reserved"), ("vram_allocated_bytes", "vram_allocated")):
        if nbytes(measured.get(key)):
            candidates.append((nbytes(measured.get(key)), name))
            break
    return max(candidates, key=lambda c: c[0]) if candidates else None


def host_comparable(host_breakdown: Any) -> int | None:
    """The host estimate a summed ``VmHWM`` is compared with: its parts less the page cache
    (:data:`PAGE_CACHE`); None without a breakdown."""
    if not isinstance(host_breakdown, dict) or not host_breakdown:
        return None
    parts = {k: nbytes(v) for k, v in host_breakdown.items()}
    if any(v is None for v in parts.values()):
        return None
    return sum(v for k, v in parts.items() if k not in PAGE_CACHE)
