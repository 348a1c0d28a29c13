"""``dsplan report RUN_DIR``: each attempt's estimate beside the peak it really reached.

One row per attempt of the run's ledger (``attempts.jsonl``), for the GPU and for the
host separately:

- **estimate**: the plan's figure for the tier and micro-batch the attempt ran
  (``estimate.gpu_bytes`` per GPU, ``estimate.host_bytes`` per node);
- **peak**: what was measured.  On the GPU LLaMA-Factory's ``vram_reserved`` peak (the
  allocator's hold), else ``vram_allocated``; on the host the summed ``VmHWM`` of the
  ranks dsplan saw;
- **compared**: the part of the estimate a peak of that kind can show, by the one rule of
  :mod:`dsplan.learn.compare`: a reserved peak never holds the CUDA/HIP context or NCCL's
  buffers (they are not allocated through PyTorch's caching allocator), so it is held
  against the estimate less those two; an allocated peak against the estimate less its
  whole ``overhead``; a host peak (resident memory) against the host estimate less the
  page cache of the checkpoints read.  The context and NCCL figures are the ones the
  ledger recorded; a ledger from before they were recorded gets the backend's default,
  and the report says so;
- **error** = (compared - peak) / peak.  Positive: the estimate was above the peak
  (safe); negative: it was below.

An attempt that ran out of memory never reached its peak, so what it shows is a lower
bound on the demand (marked ``>=``, :func:`dsplan.learn.compare.oom_bound`): on the GPU,
what was reserved (else allocated) when it failed plus the allocation that failed, or
the logged peak if that is higher, compared like a reserved peak; on the host, the peak
seen.  Its error is then an upper bound (``<=``).  Bounds are listed but left out of
the median and worst error.

The ``gap`` line names the component that most likely explains a miss, by two rules:

1. a GPU OOM whose failed allocation ("tried to allocate") is within
   :data:`MATCH_TOLERANCE` of a component that is one allocation
   (:data:`SINGLE_ALLOCATION`: the fp32 ``logits``, a ZeRO-3 gather of the largest layer,
   a dequantized weight, ...) names that component (the closest one): a tensor of that
   size is what could not be placed.  Aggregates (weights, gradients, optimizer states,
   overhead) are never matched: no single allocation has their size;
2. otherwise an underestimate names the largest transient component
   (:data:`TRANSIENT`), the part most sensitive to the workload's shape; on the host,
   the largest host component the peak can include (not the page cache).

Ledgers from before the estimate was recorded still report, with blanks.  Standard
library and rich only (no torch, DeepSpeed, LLaMA-Factory; matplotlib lives in
:mod:`dsplan.learn.plot`).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsplan.codes import Component, HostComponent, Verdict
from dsplan.errors import UserError, excerpt, one_line
from dsplan.inputs.reading import path_kind
from dsplan.launch.ledger import ATTEMPTS_FILE, AttemptRecord, load_ledger
from dsplan.learn.compare import (
    ALLOCATED,
    ALLOCATOR_KINDS,
    COMPARED_AS,
    OOM_BOUND,
    PAGE_CACHE,
    RESERVED,
    SHORT,
    host_comparable,
    nbytes,
    oom_bound,
    recorded,
)
from dsplan.units import GiB

#: A failed allocation within this fraction of a component's size is taken to be that component.
MATCH_TOLERANCE = 0.10
#: Components that exist only during the step (activations, the loss, gathers, workspaces).
TRANSIENT = frozenset({
    Component.ACTIVATIONS, Component.LOGITS, Component.ZERO3_GATHER, Component.ZERO3_LIVE,
    Component.OPTIMIZER_STEP, Component.DEQUANT_WORKSPACE, Component.REF_FORWARD, Component.KL_FORWARD,
    Component.KV_CACHE, Component.GENERATION_GATHER, Component.ATTENTION_MASK, Component.DORA_WORKSPACE,
    Component.DS_BUFFERS,
})
#: Components that are one tensor (or one allocation), so a failed allocation can have their size.
SINGLE_ALLOCATION = frozenset({
    Component.LOGITS, Component.ZERO3_GATHER, Component.DEQUANT_WORKSPACE, Component.OPTIMIZER_STEP,
    Component.LOAD_UPCAST, Component.GENERATION_GATHER, Component.ATTENTION_MASK, Component.DORA_WORKSPACE,
    Component.KV_CACHE,
})
#: The host peak's kind: the summed resident high-water mark of the ranks.
HOST_PEAK = "host_vmhwm"
HOST_COMPARED_AS = "host estimate - page cache"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _sizes(value: Any) -> dict[str, int]:
    """A ``{component: bytes}`` breakdown, damaged entries dropped."""
    out = {}
    for k, v in _dict(value).items():
        n = nbytes(v)
        if isinstance(k, str) and n is not None:
            out[k] = n
    return out


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


@dataclass(frozen=True)
class Side:
    """One resource (GPU or host) of one attempt: the estimate against the peak.  ``estimate`` is the
    whole estimate, ``compared`` the part of it a peak of ``kind`` can show (what the error is of)."""

    estimate: int | None
    compared: int | None
    peak: int | None
    bound: bool = False  # peak is a lower bound on the demand (the attempt ran out of memory)
    source: str | None = None  # what the peak is: vram_reserved, vram_allocated, oom_figures, host_peak
    kind: str | None = None  # how it is compared (dsplan.learn.compare's kinds, or HOST_PEAK)

    @property
    def error(self) -> float | None:
        """(compared - peak) / peak; an upper bound when ``bound``."""
        if self.compared is None or not self.peak:
            return None
        return (self.compared - self.peak) / self.peak

    @property
    def compared_as(self) -> str | None:
        return HOST_COMPARED_AS if self.kind == HOST_PEAK else COMPARED_AS.get(self.kind)

    def to_json(self) -> dict[str, Any]:
        err = self.error
        return {"estimate_bytes": self.estimate, "compared_bytes": self.compared, "compared_as": self.compared_as,
                "peak_bytes": self.peak, "peak_source": self.source, "lower_bound": self.bound,
                "error_pct": None if err is None else round(100 * err, 2)}


@dataclass(frozen=True)
class Gap:
    """What most likely explains the difference: a component, or only a sentence."""

    text: str
    component: str | None = None
    component_bytes: int | None = None


@dataclass
class Row:
    """One attempt of the report."""

    attempt: int
    tier: str
    micro_batch: int
    grad_accum: int
    cutoff_len: int
    verdict: str
    gpu: Side
    host: Side
    breakdown: dict[str, int]
    host_breakdown: dict[str, int]
    measured: dict[str, int | None]
    oom_figures: dict[str, int | None] | None
    unfinished: bool = False
    preflight: bool = False
    hardware: dict | None = None
    gap: Gap = field(default_factory=lambda: Gap(""))
    notes: list[str] = field(default_factory=list)


def _gpu_peak(verdict: str, measured: dict, figures: dict | None) -> tuple[int | None, str | None, str | None]:
    """(peak, its source, its comparison kind): an OOM's lower bound, else the logged reserved or allocated peak."""
    if verdict == Verdict.GPU_OOM:
        bound = oom_bound(figures, measured)
        return (bound[0], bound[1], OOM_BOUND) if bound else (None, None, None)
    if measured.get("vram_reserved_bytes"):
        return measured["vram_reserved_bytes"], "vram_reserved", RESERVED
    if measured.get("vram_allocated_bytes"):
        return measured["vram_allocated_bytes"], "vram_allocated", ALLOCATED
    return None, None, None


def _gpu_side(verdict: str, est: dict, hardware: Any, measured: dict, figures: dict | None) -> tuple[Side, str | None]:
    """The GPU side, and a note when the comparison assumed the backend's default context."""
    figs, note = recorded(est, hardware)
    peak, source, kind = _gpu_peak(verdict, measured, figures)
    whole = None if figs is None else int(figs.gpu_bytes)
    compared = None if figs is None or kind is None else int(figs.comparable(kind))
    side = Side(whole, compared, peak, verdict == Verdict.GPU_OOM and peak is not None, source, kind)
    return side, note if kind in ALLOCATOR_KINDS and figs is not None else None


def _host_side(verdict: str, est: dict, measured: dict) -> Side:
    peak = measured.get("host_peak_bytes") or None
    return Side(nbytes(est.get("host_bytes")), host_comparable(est.get("host_breakdown")), peak,
                peak is not None and verdict == Verdict.HOST_OOM, "host_peak" if peak else None,
                HOST_PEAK if peak else None)


def _figures(value: Any) -> dict[str, int | None] | None:
    if not isinstance(value, dict):
        return None
    return {k: nbytes(value.get(k)) for k in ("tried", "allocated", "reserved", "total", "free")}


def build_row(rec: AttemptRecord) -> Row:
    """The report's row for one ledger record (any of its newer keys may be missing or damaged)."""
    x = rec.extra
    est = _dict(x.get("estimate"))
    raw = _dict(x.get("measured"))
    measured = {k: nbytes(raw.get(k)) for k in ("vram_allocated_bytes", "vram_reserved_bytes", "host_peak_bytes")}
    figures = _figures(x.get("oom_figures"))
    hardware = x.get("hardware") if isinstance(x.get("hardware"), dict) else None
    gpu, note = _gpu_side(rec.verdict, est, hardware, measured, figures)
    row = Row(rec.attempt, rec.tier, rec.micro_batch, rec.grad_accum, rec.cutoff_len, rec.verdict,
              gpu=gpu, host=_host_side(rec.verdict, est, measured),
              breakdown=_sizes(est.get("breakdown")), host_breakdown=_sizes(est.get("host_breakdown")),
              measured=measured, oom_figures=figures, unfinished=rec.is_unfinished,
              preflight=x.get("preflight") is True, hardware=hardware, notes=[note] if note else [])
    row.gap = find_gap(row, bool(est))
    return row


# --------------------------------------------------------------------------- the gap


def _help(name: str, host: bool = False) -> str:
    try:
        return (HostComponent(name) if host else Component(name)).help
    except ValueError:
        return ""


def _named(name: str, size: int, host: bool = False) -> str:
    why = _help(name, host)
    return f"{name} ({gib(size)} GiB estimated){': ' + why if why else ''}"


def matching_component(tried: int | None, breakdown: dict[str, int]) -> str | None:
    """The single-allocation component (:data:`SINGLE_ALLOCATION`) whose size is closest to ``tried``,
    if within :data:`MATCH_TOLERANCE` of it."""
    if not tried:
        return None
    close = [(abs(tried - size) / size, name) for name, size in breakdown.items()
             if name in SINGLE_ALLOCATION and size > 0 and abs(tried - size) <= MATCH_TOLERANCE * size]
    return min(close)[1] if close else None


def find_gap(row: Row, has_estimate: bool) -> Gap:
    """Which component most likely explains the difference (the module's two rules)."""
    if not has_estimate:
        return Gap("no estimate recorded (a ledger from an older dsplan)")
    tried = (row.oom_figures or {}).get("tried") if row.verdict == Verdict.GPU_OOM else None
    name = matching_component(tried, row.breakdown)
    if name is not None:
        return Gap(f"the failed allocation matches {_named(name, row.breakdown[name])}",
                   name, row.breakdown[name])
    sides = [(s, parts, host) for s, parts, host in ((row.gpu, row.breakdown, False),
                                                      (row.host, row.host_breakdown, True)) if s.error is not None]
    for side, parts, host in sides:
        if side.error < 0:
            return _under(side, parts, host)
    if sides:
        side, _, host = sides[0]
        what = "host" if host else "GPU"
        if side.bound:
            return Gap(f"{what}: ran out of memory although the estimate is above the {gib(side.peak)} GiB "
                       "known at failure; the figures do not say what was missing")
        return Gap(f"{what}: the estimate covers the peak by {gib(side.compared - side.peak)} GiB "
                   f"({100 * side.error:+.1f}%)")
    return Gap("nothing measured (no vram peak logged, no OOM figures, no host peak)")


def _under(side: Side, parts: dict[str, int], host: bool) -> Gap:
    """Rule 2: an underestimate names the largest transient component (host: the largest one a
    resident peak can include, so not the page cache)."""
    short = side.peak - side.compared
    what = "host" if host else "GPU"
    text = f"{what}: underestimate by {'at least ' if side.bound else ''}{gib(short)} GiB ({100 * side.error:+.1f}%)"
    pool = ({k: v for k, v in parts.items() if k not in PAGE_CACHE} if host
            else {k: v for k, v in parts.items() if k in TRANSIENT})
    if not pool:
        return Gap(text)
    top = max(pool, key=pool.get)
    kind = "largest part" if host else "largest transient part"
    return Gap(f"{text}; {kind}: {_named(top, pool[top], host)}", top, pool[top])


# --------------------------------------------------------------------------- the whole run


def _errors(rows: list[Row], which: str) -> dict[str, Any]:
    sides = [(r.attempt, getattr(r, which)) for r in rows]
    measured = [(abs(s.error), n) for n, s in sides if s.error is not None and not s.bound]
    bounds = sum(1 for _, s in sides if s.error is not None and s.bound)
    worst = max(measured, key=lambda t: t[0], default=None)  # ties: the first
    return {"measured": len(measured), "lower_bounds": bounds,
            "median_abs_error_pct": round(100 * statistics.median(e for e, _ in measured), 2) if measured else None,
            "worst_abs_error_pct": round(100 * worst[0], 2) if worst else None,
            "worst_attempt": worst[1] if worst else None}


@dataclass
class Report:
    run_dir: Path
    rows: list[Row]
    problems: list[str]

    def summary(self) -> dict[str, Any]:
        return {"attempts": len(self.rows), "gpu": _errors(self.rows, "gpu"), "host": _errors(self.rows, "host")}

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "attempts": [row_json(r) for r in self.rows],
                "summary": self.summary(), "problems": list(self.problems)}


def row_json(r: Row) -> dict[str, Any]:
    """One attempt in ``report --json``: bytes as integers, null where nothing was recorded."""
    return {"attempt": r.attempt, "tier": r.tier, "micro_batch": r.micro_batch, "grad_accum": r.grad_accum,
            "cutoff_len": r.cutoff_len, "verdict": r.verdict, "unfinished": r.unfinished,
            "preflight": r.preflight, "hardware": r.hardware, "gpu": r.gpu.to_json(), "host": r.host.to_json(),
            "measured": dict(r.measured), "oom_figures": r.oom_figures,
            "gap": {"component": r.gap.component, "component_bytes": r.gap.component_bytes, "text": r.gap.text},
            "notes": list(r.notes)}


def load_report(run_dir: Path | str) -> Report:
    """Read ``RUN_DIR/attempts.jsonl`` into a report.  A missing folder or ledger is a UserError."""
    run_dir = Path(run_dir)
    try:
        os.stat(run_dir)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"no run folder {excerpt(str(run_dir))}") from None
    except (OSError, ValueError) as e:  # a name too long, no permission, a NUL byte
        raise UserError(f"cannot use run folder {excerpt(str(run_dir))}: {getattr(e, 'strerror', None) or e}") \
            from None
    if path_kind(run_dir) != "dir":
        raise UserError(f"no run folder {excerpt(str(run_dir))}")
    if path_kind(run_dir / ATTEMPTS_FILE) != "file":
        raise UserError(f"{excerpt(str(run_dir))} has no {ATTEMPTS_FILE}: not a dsplan run folder, or no attempt "
                        "has started in it yet")
    try:
        ledger = load_ledger(run_dir)
    except OSError as e:
        raise UserError(f"cannot read {excerpt(str(run_dir / ATTEMPTS_FILE))}: {e.strerror or e}") from None
    return Report(run_dir, [build_row(r) for r in ledger.records], [one_line(p) for p in ledger.problems])


# --------------------------------------------------------------------------- terminal output


def peak_cell(side: Side) -> str:
    return "-" if side.peak is None else ("\u2265" if side.bound else "") + gib(side.peak)


def error_cell(side: Side) -> str:
    err = side.error
    return "-" if err is None else ("\u2264" if side.bound else "") + f"{100 * err:+.1f}%"


def verdict_cell(r: Row) -> str:
    text = "unfinished" if r.unfinished else r.verdict
    return text + (" (preflight)" if r.preflight else "")


def describe_hardware(hw: dict) -> str:
    """``cuda NVIDIA H200, 139.8 GiB per GPU, world size 8`` from whatever keys the record has."""
    parts = [" ".join(str(hw[k]) for k in ("backend", "gpu_name") if isinstance(hw.get(k), str) and hw[k])]
    mem = nbytes(hw.get("gpu_mem_bytes", hw.get("gpu_mem")))
    if mem:
        parts.append(f"{mem / GiB:.1f} GiB per GPU")
    for key, name in (("nodes", "nodes"), ("world_size", "world size")):
        value = hw.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and (key != "nodes" or value > 1):
            parts.append(f"{value} {name}" if key == "nodes" else f"{name} {value}")
    return one_line(", ".join(p for p in parts if p)) or "(not described)"


def hardware_lines(rows: list[Row]) -> list[str]:
    """One line per distinct hardware the attempts recorded (none when no record has it)."""
    seen: dict[str, list[int]] = {}
    for r in rows:
        if r.hardware is not None:
            seen.setdefault(describe_hardware(r.hardware), []).append(r.attempt)
    if len(seen) == 1 and len(next(iter(seen.values()))) == len(rows):
        return [f"hardware: {next(iter(seen))}"]
    return [f"hardware (attempt {', '.join(map(str, ns))}): {d}" for d, ns in seen.items()]


def figures_text(r: Row) -> str:
    """``OOM at 13.50 GiB reserved, 13.10 GiB allocated of 15.77 GiB, tried 2.32 GiB; `` (a GPU OOM's figures)."""
    f = r.oom_figures
    if r.verdict != Verdict.GPU_OOM or not f or not any(f.values()):
        return ""
    parts = [f"{gib(f[k])} GiB {k}" for k in ("reserved", "allocated") if f.get(k) is not None]
    if f.get("total") is not None:
        parts.append(f"of {gib(f['total'])} GiB")
    if f.get("tried") is not None:
        parts.append(f"tried {gib(f['tried'])} GiB")
    return f"OOM at {', '.join(parts)}; ".replace(", of ", " of ")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    for which, name in (("gpu", "GPU"), ("host", "host")):
        s = summary[which]
        bounds = f"; {s['lower_bounds']} OOM lower bound{'s' * (s['lower_bounds'] != 1)} not counted" \
            if s["lower_bounds"] else ""
        if not s["measured"]:
            out.append(f"{name} error: no measured attempt{bounds}")
            continue
        n = s["measured"]
        out.append(f"{name} error over {n} measured attempt{'s' * (n != 1)}: median |error| "
                   f"{s['median_abs_error_pct']:.1f}%, worst {s['worst_abs_error_pct']:.1f}% "
                   f"(attempt {s['worst_attempt']}){bounds}")
    return out


_COLUMNS = (("#", "right"), ("tier", "left"), ("mb x GA", "right"), ("cutoff", "right"), ("verdict", "left"),
            ("GPU est", "right"), ("peak kind", "left"), ("est compared", "right"), ("GPU peak", "right"),
            ("GPU err", "right"), ("host est", "right"), ("est w/o cache", "right"), ("host peak", "right"),
            ("host err", "right"))
LEGEND = (
    "sizes in GiB, GPU per GPU and host per node; GPU est: the whole estimate, host est: the whole host estimate",
    ("est compared: the part of the estimate the peak can show. reserved (vram_reserved) and OOM bound: less the "
     "context and NCCL buffers, which are outside PyTorch's allocator; allocated (vram_allocated, when no reserved "
     "peak was logged): less the whole overhead"),
    "host: the summed VmHWM of the ranks against the host estimate without page cache (checkpoint_cache)",
    ("error = (compared - peak) / peak; \u2265: an OOM's lower bound on the demand (reserved, else allocated, + "
     "tried at failure, or the logged peak), so its error is at most the figure shown"),
)


def _cells(r: Row) -> list[str]:
    return [str(r.attempt), one_line(r.tier), f"{r.micro_batch} x {r.grad_accum}", str(r.cutoff_len),
            verdict_cell(r), gib(r.gpu.estimate), SHORT.get(r.gpu.kind, "-"), gib(r.gpu.compared), peak_cell(r.gpu),
            error_cell(r.gpu), gib(r.host.estimate), gib(r.host.compared), peak_cell(r.host), error_cell(r.host)]


def note_lines(rows: list[Row]) -> list[str]:
    """Each distinct note once, with the attempts it is about."""
    seen: dict[str, list[int]] = {}
    for r in rows:
        for note in r.notes:
            seen.setdefault(note, []).append(r.attempt)
    return [one_line(f"note (attempt {', '.join(map(str, ns))}): {text}") for text, ns in seen.items()]


def print_report(report: Report, file=None) -> None:
    """The table, the gap lines and the summary, for a person."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=file, highlight=False, soft_wrap=True, markup=False,
                      width=max(200, Console(file=file).width))
    n = len(report.rows)
    console.print(one_line(f"dsplan report: {report.run_dir} ({n} attempt{'s' * (n != 1)})"))
    if not report.rows:
        console.print(f"no attempt recorded in {ATTEMPTS_FILE} yet")
        return
    for line in (*hardware_lines(report.rows), *LEGEND):
        console.print(line)
    table = Table(box=box.SIMPLE_HEAD)
    for name, just in _COLUMNS:
        table.add_column(name, justify=just, no_wrap=True)
    for r in report.rows:
        table.add_row(*(Text(c) for c in _cells(r)))
    console.print(table)
    console.print("gap:")
    for r in report.rows:
        console.print(one_line(f"  attempt {r.attempt}: {figures_text(r)}{r.gap.text}"))
    for line in (*note_lines(report.rows), *summary_lines(report.summary())):
        console.print(line)
