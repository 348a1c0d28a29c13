"""``dsplan report RUN_DIR``: each attempt's estimate beside the peak it really reached.

One row per attempt of the run's ledger (``attempts.jsonl``), for the GPU and for the
host separately:

- **estimate**: the plan's figure for the tier and micro-batch the attempt ran
  (``estimate.gpu_bytes`` per GPU, ``estimate.host_bytes`` per node);
- **peak**: what was measured.  On the GPU LLaMA-Factory's ``vram_reserved`` peak (the
  allocator's hold, which is what has to fit), else ``vram_allocated``; on the host the
  summed ``VmHWM`` of the ranks dsplan saw;
- **error** = (estimate - peak) / peak.  Positive: the estimate was above the peak
  (safe); negative: it was below.

An attempt that ran out of memory never reached its peak, so what it shows is a lower
bound on the demand (marked ``>=``): on the GPU, the memory reserved when it failed plus
the allocation that failed (``reserved + tried``; ``allocated`` when no reserved figure
was stated), or the logged peak if that is higher; on the host, the peak seen.  Its
error is then an upper bound (``<=``): the estimate was short by at least that much
when it is negative.  Bounds are listed but left out of the median and worst error.

The ``gap`` line names the component that most likely explains a miss, by two rules:

1. a GPU OOM whose failed allocation ("tried to allocate") is within
   :data:`MATCH_TOLERANCE` of one component of the breakdown names that component (the
   closest one): a tensor of that size is what could not be placed, e.g. the fp32
   ``logits`` or a ZeRO-3 gather of the largest layer (``zero3_gather``);
2. otherwise an underestimate names the largest transient component
   (:data:`TRANSIENT`), the part most sensitive to the workload's shape; on the host,
   where nothing is transient, the largest host component.

Ledgers from before the estimate was recorded still report, with blanks.  Standard
library and rich only (no torch, DeepSpeed, LLaMA-Factory; matplotlib lives in
:mod:`dsplan.learn.plot`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsplan.codes import Component, HostComponent, Verdict
from dsplan.errors import UserError, excerpt, one_line
from dsplan.launch.ledger import ATTEMPTS_FILE, AttemptRecord, load_ledger
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


def nbytes(value: Any) -> int | None:
    """A byte count from a ledger field: a finite number >= 0, else None (absent or damaged)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value) if value >= 0 else None


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


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


@dataclass(frozen=True)
class Side:
    """One resource (GPU or host) of one attempt: the estimate against the peak."""

    estimate: int | None
    peak: int | None
    bound: bool = False  # peak is a lower bound on the demand (the attempt ran out of memory)
    source: str | None = None  # what the peak is: vram_reserved, vram_allocated, oom_figures, host_peak

    @property
    def error(self) -> float | None:
        """(estimate - peak) / peak; an upper bound when ``bound``."""
        if self.estimate is None or not self.peak:
            return None
        return (self.estimate - self.peak) / self.peak

    def to_json(self) -> dict[str, Any]:
        err = self.error
        return {"estimate_bytes": self.estimate, "peak_bytes": self.peak, "peak_source": self.source,
                "lower_bound": self.bound, "error_pct": None if err is None else round(100 * err, 2)}


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


def _gpu_side(verdict: str, est: dict, measured: dict, figures: dict | None) -> Side:
    estimate = nbytes(est.get("gpu_bytes"))
    if estimate is None and _sizes(est.get("breakdown")):
        estimate = sum(_sizes(est.get("breakdown")).values())
    reserved, allocated = measured.get("vram_reserved_bytes"), measured.get("vram_allocated_bytes")
    logged = (reserved, "vram_reserved") if reserved else (allocated, "vram_allocated") if allocated else (None, None)
    if verdict != Verdict.GPU_OOM:
        return Side(estimate, logged[0], False, logged[1])
    figures = figures or {}
    held = figures.get("reserved") or figures.get("allocated")
    at_failure = (held or 0) + (figures.get("tried") or 0) or None
    best = max([c for c in ((at_failure, "oom_figures"), logged) if c[0]], default=(None, None))
    return Side(estimate, best[0], best[0] is not None, best[1])


def _host_side(verdict: str, est: dict, measured: dict) -> Side:
    estimate = nbytes(est.get("host_bytes"))
    peak = measured.get("host_peak_bytes") or None
    return Side(estimate, peak, peak is not None and verdict == Verdict.HOST_OOM, "host_peak" if peak else None)


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
    row = Row(rec.attempt, rec.tier, rec.micro_batch, rec.grad_accum, rec.cutoff_len, rec.verdict,
              gpu=_gpu_side(rec.verdict, est, measured, figures), host=_host_side(rec.verdict, est, measured),
              breakdown=_sizes(est.get("breakdown")), host_breakdown=_sizes(est.get("host_breakdown")),
              measured=measured, oom_figures=figures, unfinished=rec.is_unfinished,
              preflight=x.get("preflight") is True,
              hardware=x.get("hardware") if isinstance(x.get("hardware"), dict) else None)
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
    """The component whose size is closest to ``tried``, if within :data:`MATCH_TOLERANCE` of it."""
    if not tried:
        return None
    close = [(abs(tried - size) / size, name) for name, size in breakdown.items()
             if size > 0 and abs(tried - size) <= MATCH_TOLERANCE * size]
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
        return Gap(f"{what}: the estimate covers the peak by {gib(side.estimate - side.peak)} GiB "
                   f"({100 * side.error:+.1f}%)")
    return Gap("nothing measured (no vram peak logged, no OOM figures, no host peak)")


def _under(side: Side, parts: dict[str, int], host: bool) -> Gap:
    """Rule 2: an underestimate names the largest transient component (host: the largest one)."""
    short = side.peak - side.estimate
    what = "host" if host else "GPU"
    text = f"{what}: underestimate by {'at least ' if side.bound else ''}{gib(short)} GiB ({100 * side.error:+.1f}%)"
    pool = parts if host else {k: v for k, v in parts.items() if k in TRANSIENT}
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
            "gap": {"component": r.gap.component, "component_bytes": r.gap.component_bytes, "text": r.gap.text}}


def load_report(run_dir: Path | str) -> Report:
    """Read ``RUN_DIR/attempts.jsonl`` into a report.  A missing folder or ledger is a UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no run folder {excerpt(str(run_dir))}")
    if not (run_dir / ATTEMPTS_FILE).is_file():
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
            ("GPU est", "right"), ("GPU peak", "right"), ("alloc", "right"), ("GPU err", "right"),
            ("host est", "right"), ("host peak", "right"), ("host err", "right"))


def _cells(r: Row) -> list[str]:
    return [str(r.attempt), one_line(r.tier), f"{r.micro_batch} x {r.grad_accum}", str(r.cutoff_len),
            verdict_cell(r), gib(r.gpu.estimate), peak_cell(r.gpu), gib(r.measured["vram_allocated_bytes"]),
            error_cell(r.gpu), gib(r.host.estimate), peak_cell(r.host), error_cell(r.host)]


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
    for line in hardware_lines(report.rows):
        console.print(line)
    console.print("sizes in GiB, GPU per GPU and host per node; GPU peak: vram_reserved, else vram_allocated")
    console.print("error = (estimate - peak) / peak; \u2265: an OOM's lower bound on the demand, so its error is "
                  "at most the figure shown")
    table = Table(box=box.SIMPLE_HEAD)
    for name, just in _COLUMNS:
        table.add_column(name, justify=just, no_wrap=True)
    for r in report.rows:
        table.add_row(*(Text(c) for c in _cells(r)))
    console.print(table)
    console.print("gap:")
    for r in report.rows:
        console.print(one_line(f"  attempt {r.attempt}: {figures_text(r)}{r.gap.text}"))
    for line in summary_lines(report.summary()):
        console.print(line)
