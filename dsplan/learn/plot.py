"""``dsplan report --plot FILE``: a small PNG of each attempt's estimate beside its peak.

One pair of bars per attempt: the estimate and the measured peak, in GiB, on the GPU,
or on the host when the attempt has no GPU figure (its label then says ``host``).  The
estimate's bar is the part the peak is compared with (:mod:`dsplan.learn.compare`: less
the context and NCCL for a reserved peak, less the overhead for an allocated one, less
the page cache on the host), as the report's error is.  An
OOM's lower bound is drawn hatched and marked ``>=``: the demand was at least that.
The verdict is in each label.

matplotlib is imported only here, only when a plot is asked for, and without pyplot
(a bare ``Figure`` on the Agg canvas: no display, no global state).  Without it,
one line says to install ``dsplan[plot]``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from dsplan.errors import UserError, excerpt
from dsplan.fsutil import atomic_write
from dsplan.learn.report import Report, Row, Side, verdict_cell
from dsplan.units import GiB

_ESTIMATE, _PEAK = "#4c72b0", "#dd8452"


def check_target(path: Path, force: bool) -> None:
    """Refuse an existing file unless ``force``, and a name the system refuses (too long, no
    permission); called before any work is done."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # a new file (a missing folder is created; a file in the way is refused when writing)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write --plot {excerpt(str(path))}: {getattr(e, 'strerror', None) or e}") from None
    if path.is_dir():
        raise UserError(f"--plot {excerpt(str(path))} is a folder; give a file name such as report.png")
    if not force:
        raise UserError(f"{excerpt(str(path))} already exists; choose another --plot file or pass --force")


def _side(r: Row) -> tuple[Side, str]:
    """The GPU, unless only the host has a figure."""
    if r.gpu.peak is None and r.host.peak is not None:
        return r.host, "host"
    return r.gpu, "GPU"


def _load_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'dsplan[plot]'") from None
    return Figure, FigureCanvasAgg


def render_png(report: Report) -> bytes:
    """The chart as PNG bytes."""
    Figure, FigureCanvasAgg = _load_matplotlib()
    n = max(len(report.rows), 1)
    fig = Figure(figsize=(min(2.0 + 1.1 * n, 14.0), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width, labels, top = 0.38, [], 0.0
    for i, r in enumerate(report.rows):
        side, where = _side(r)
        labels.append(f"#{r.attempt} {r.tier}\n{verdict_cell(r)}" + ("\n(host)" if where == "host" else ""))
        if side.compared is not None:
            _bar(ax, i - width / 2, side.compared / GiB, width, False, _ESTIMATE)
        if side.peak is not None:
            _bar(ax, i + width / 2, side.peak / GiB, width, side.bound, _PEAK)
        top = max(top, (side.compared or 0) / GiB, (side.peak or 0) / GiB)
    ax.set_xticks(range(len(report.rows)), labels, fontsize=7)
    ax.set_ylim(0, top * 1.12 if top else 1.0)
    ax.set_ylabel("GiB (GPU: per GPU; host: per node)", fontsize=8)
    ax.set_title(f"estimate vs measured peak: {report.run_dir.name}", fontsize=9)
    _legend(ax)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _bar(ax, x: float, value: float, width: float, bound: bool, color: str) -> None:
    """One bar with its value on top; a lower bound hatched and marked with \u2265."""
    if bound:
        ax.bar(x, value, width, color="white", edgecolor=color, hatch="///")
    else:
        ax.bar(x, value, width, color=color)
    mark = "\u2265" if bound else ""
    ax.text(x, value, f"{mark}{value:.1f}", ha="center", va="bottom", fontsize=6)


def _legend(ax) -> None:
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=_ESTIMATE, label="estimate, part compared"),
                       Patch(color=_PEAK, label="measured peak"),
                       Patch(facecolor="white", edgecolor=_PEAK, hatch="///", label="OOM: at least")],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def write_plot(report: Report, path: Path, force: bool = False) -> Path:
    """Render the chart and write it to ``path`` atomically (temp file beside it, then rename)."""
    check_target(path, force)
    data = render_png(report)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as e:
        raise UserError(f"cannot write {excerpt(str(path))}: {e.strerror or e}") from None
    return path
