"""Site calibration: the runtime overhead fitted to measured GPU peaks, per backend and card, and its file.

dsplan's estimate is a sum of modelled components plus a runtime ``overhead``:
the context and libraries (``context_bytes``), communication buffers when there is
more than one GPU (``nccl_bytes``), allocator slack, a fraction ``slack[stage]`` of
the step's transient memory, and a fitted ``extra_bytes`` (0 by default)
(:class:`dsplan.estimate.estimate.Runtime`).  The defaults were set from one public
figure.  ``dsplan calibrate`` fits them to what the user's own cards showed
(:mod:`dsplan.learn.samples`), per backend and card, so a sample from an A100 never
moves an MI300X's plan.

What is measured is PyTorch's caching allocator: LLaMA-Factory's ``vram_reserved`` is
``torch.cuda.max_memory_reserved``, and an OOM message's "reserved"/"tried" figures are
the allocator's too.  The CUDA/HIP context and NCCL's buffers are allocated outside it
and never show there, so they cannot be fitted from these figures and keep their
defaults.  The model of one measured reserved peak::

    measured ~= (gpu_bytes - overhead) + extra + slack[stage] * transient

- **Three or more measured peaks** (finished runs): weighted least squares for
  ``extra`` and the slack of each ZeRO stage that has samples, minimising the
  squared *relative* error, so a 7B and a 70B run count alike.  A stage without
  samples keeps dsplan's default.  When the samples cannot separate the two (every
  one with the same transient memory, say), only ``extra`` is fitted.  Slack is kept
  within 0..:data:`MAX_SLACK`, ``extra`` within 0..:data:`MAX_EXTRA`: a calibration
  only ever adds to the modelled parts, it never plans below them.
- **GPU OOMs** are lower bounds: the step needed at least reserved + tried.  After
  the fit ``extra`` is raised until no OOM sample is predicted below its bound, so
  an OOM only ever moves the overhead up.
- **One or two measured peaks** (or only OOMs): too few to fit two coefficients.  The
  defaults stay, and the entry records a *headroom shift* instead: the worst relative
  underestimate among the samples (never below 0, at most :data:`MAX_SHIFT`), by
  which every GPU estimate is then raised.  When the card's entry is already a fit, the
  fit stays and the few new samples only check it: the shift is the worst underestimate
  of the fitted coefficients (never below the shift the entry had), and the entry keeps
  kind ``fit`` with its runs counted in.
- **Slack needs two sizes.**  A stage's slack is fitted only when its runs have at least
  two distinct transient sizes (:data:`DISTINCT_TRANSIENT` apart); with one, slack and
  ``extra`` are the same unknown, so that stage keeps its slack and only ``extra`` is
  fitted.  ``fitted_stages`` lists the stages whose slack was solved, and the output
  names only those.
- **A fit that does not fit.**  When the median |error| after the fit stays above
  :data:`DISAGREE_MEDIAN`, the runs disagree with the model itself (rows sized at
  cutoff_len while the real batches were shorter, runs of different settings mixed,
  a part the model lacks).  The entry is still written, with a ``warning`` that
  ``calibrate`` and ``plan`` print.

The comparison itself (which part of an estimate a reserved peak can show) is
:mod:`dsplan.learn.compare`'s, the rule ``dsplan report`` uses too.

The file is JSON: ``$DSPLAN_CALIBRATION``, else ``$XDG_CONFIG_HOME/dsplan/calibration.json``
(``~/.config/dsplan/calibration.json``)::

    {"format": "dsplan-calibration", "version": 1,
     "entries": {"cuda/H200": {"backend": "cuda", "card": "H200", "site": null, "kind": "fit",
                               "context_bytes": ..., "nccl_bytes": ..., "extra_bytes": ...,
                               "slack": {"2": 0.2, "3": 0.55},
                               "headroom_shift": 0.0, "runs": 5, "measured": 4, "oom_bounds": 1,
                               "fitted_stages": [2, 3], "warning": null,
                               "sources": [...], "residuals": {"before": {"median": .., "worst": ..},
                                                                 "after": {...}},
                               "created": "2025-01-01T00:00:00+00:00"}}}

One entry per backend and card (``--site`` labels it); a new calibration of the same
backend and card replaces its entry and keeps the others.  Residuals are relative
errors of the estimate against the measured peaks, (estimate - measured) / measured:
negative is an underestimate.  ``plan``, ``render`` and ``run`` use the entry of the
profile's backend and card, and none when there is no such entry; when the file has
entries for the backend but not for the card, ``plan`` names them (:func:`unmatched_why`).
"""

from __future__ import annotations

import json
import math
import os
import stat
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from dsplan.errors import UserError, excerpt, one_line
from dsplan.estimate.estimate import Runtime
from dsplan.inputs.hardware import BACKENDS
from dsplan.learn.compare import OOM_BOUND, RESERVED, with_runtime
from dsplan.learn.samples import UNKNOWN_CARD, Sample, Samples, card_name
from dsplan.units import GiB

FORMAT = "dsplan-calibration"
VERSION = 1
FILE_NAME = "calibration.json"
#: Measured peaks a coefficient fit needs; fewer only shift the headroom.
MIN_FIT_RUNS = 3
MAX_CONTEXT = 8 * GiB
MAX_EXTRA = 16 * GiB
MAX_SLACK = 2.0
MAX_SHIFT = 1.0
#: Sources listed in an entry (the rest are counted).
MAX_SOURCES = 20
KINDS = ("fit", "headroom")
STAGES = (2, 3)
#: A stage's transient sizes must spread at least this much (relative) to tell its slack from ``extra``.
DISTINCT_TRANSIENT = 0.01
#: A median |error| after the fit above this: the runs disagree with the model, and the entry says so.
DISAGREE_MEDIAN = 0.25


def calibration_path() -> Path:
    """``$DSPLAN_CALIBRATION``, else ``calibration.json`` in dsplan's user config folder."""
    env = os.environ.get("DSPLAN_CALIBRATION")
    if env:
        return Path(env)
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "dsplan" / FILE_NAME


# ---------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class Entry:
    """One backend and card's calibration, as the file holds it."""

    backend: str
    card: str
    kind: str  # "fit" or "headroom"
    runtime: Runtime
    runs: int
    measured: int = 0
    oom_bounds: int = 0
    site: str | None = None
    sources: tuple[str, ...] = ()
    residuals: dict = field(default_factory=dict)
    created: str = ""
    path: Path | None = None  # the file it was read from
    fitted_stages: tuple[int, ...] = ()  # the ZeRO stages whose slack was fitted (kind "fit")
    warning: str | None = None  # the runs disagree with the model (see DISAGREE_MEDIAN)

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.card}"

    def to_file(self) -> dict:
        rt = self.runtime
        return {"backend": self.backend, "card": self.card, "site": self.site, "kind": self.kind,
                "context_bytes": rt.context_bytes, "nccl_bytes": rt.nccl_bytes, "extra_bytes": rt.extra_bytes,
                "slack": {str(s): v for s, v in sorted(rt.slack.items())},  # unrounded: reads back the same
                "headroom_shift": rt.headroom_shift, "runs": self.runs, "measured": self.measured,
                "oom_bounds": self.oom_bounds, "sources": list(self.sources), "residuals": self.residuals,
                "fitted_stages": list(self.fitted_stages), "warning": self.warning, "created": self.created}

    def summary(self) -> dict:
        """``plan --json``'s ``calibration`` object."""
        return {"path": str(self.path) if self.path else None, "backend": self.backend, "card": self.card,
                "site": self.site, "kind": self.kind, "runs": self.runs,
                "context_bytes": self.runtime.context_bytes, "extra_bytes": self.runtime.extra_bytes,
                "slack": {str(s): v for s, v in sorted(self.runtime.slack.items())},
                "headroom_shift": self.runtime.headroom_shift, "warning": self.warning}

    def why(self) -> str:
        """The plan's line about where its overhead comes from."""
        runs = f"{self.runs} run{'s' if self.runs != 1 else ''}"
        site = f" (site {self.site})" if self.site else ""
        where = f"runtime overhead calibrated for {self.key}{site} from {runs} in {self.path}"
        warn = f"; WARNING: {self.warning}" if self.warning else ""
        if self.kind == "headroom":
            return (f"{where}: headroom only, every GPU estimate raised {self.runtime.headroom_shift:.1%} "
                    f"(fitting the coefficients needs {MIN_FIT_RUNS} runs with a measured peak){warn}")
        return f"{where}: {describe_runtime(self.runtime)}{warn}"


def describe_runtime(rt: Runtime) -> str:
    text = (f"context {rt.context_bytes / GiB:.2f} GiB, extra {rt.extra_bytes / GiB:.2f} GiB, allocator slack "
            + ", ".join(f"{rt.slack[s]:.0%} at ZeRO-{s}" for s in STAGES))
    return text + (f", headroom shift {rt.headroom_shift:.1%}" if rt.headroom_shift else "")


# ---------------------------------------------------------------------------- the file
@dataclass
class CalibrationFile:
    path: Path
    entries: dict[str, Entry] = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # dsplan calibrate MODEL_DIR (dsplan.learn.trace): kept as read

    def lookup(self, profile) -> Entry | None:
        """The entry of this hardware profile's backend and card, or None."""
        return self.entries.get(f"{profile.backend}/{card_name(profile.gpu_name)}")

    def to_text(self) -> str:
        entries = {k: e.to_file() for k, e in sorted(self.entries.items())}
        data = {"format": FORMAT, "version": VERSION, "entries": entries}
        if self.models:
            data["models"] = self.models
        return json.dumps(data, indent=2) + "\n"


def _number(raw: dict, key: str, low: float, high: float, what: str) -> float:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        raise ValueError(f"{what}: {key} must be a number from {low:g} to {high:g}, got {excerpt(v, 40)}")
    return v


def _entry(raw, name: str, path: Path) -> Entry:
    """One entry of the file, checked; a ValueError says what is wrong with it."""
    what = f"entry {excerpt(name, 40)}"
    if not isinstance(raw, dict):
        raise ValueError(f"{what} is not an object")
    if raw.get("backend") not in BACKENDS or not isinstance(raw.get("card"), str) or raw.get("kind") not in KINDS:
        raise ValueError(f"{what}: needs backend ({', '.join(BACKENDS)}), card and kind ({', '.join(KINDS)})")
    slack = raw.get("slack")
    if not isinstance(slack, dict):
        raise ValueError(f"{what}: slack must be an object by ZeRO stage")
    runtime = Runtime(int(_number(raw, "context_bytes", 0, MAX_CONTEXT, what)),
                      int(_number(raw, "nccl_bytes", 0, MAX_CONTEXT, what)),
                      {s: float(_number(slack, str(s), 0, MAX_SLACK, f"{what} slack")) for s in STAGES},
                      float(_number(raw, "headroom_shift", 0, MAX_SHIFT, what)), source=str(path),
                      extra_bytes=int(_number(raw, "extra_bytes", 0, MAX_EXTRA, what)) if "extra_bytes" in raw else 0)
    counts = {k: int(_number(raw, k, 0, 1e9, what)) for k in ("runs", "measured", "oom_bounds") if k in raw}
    site = raw.get("site") if isinstance(raw.get("site"), str) else None
    listed = raw.get("sources") if isinstance(raw.get("sources"), list) else []
    sources = tuple(s for s in listed if isinstance(s, str))
    residuals = raw.get("residuals") if isinstance(raw.get("residuals"), dict) else {}
    fitted = raw.get("fitted_stages") if isinstance(raw.get("fitted_stages"), list) else []
    warning = raw.get("warning") if isinstance(raw.get("warning"), str) else None
    return Entry(raw["backend"], card_name(raw["card"]), raw["kind"], runtime, counts.get("runs", 0),
                 counts.get("measured", 0), counts.get("oom_bounds", 0), site, sources, residuals,
                 str(raw.get("created") or ""), path, tuple(st for st in STAGES if st in fitted),
                 one_line(warning)[:600] if warning else None)


def _is_link(path: Path) -> bool:
    """Whether ``path`` is a symbolic link; False where nothing is there.  A path the system
    refuses (a name too long, a folder without permission) is a one-line :class:`UserError`."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read calibration file {excerpt(str(path))}: {getattr(e, 'strerror', None) or e}") \
            from None


def load_calibration(path: Path | None = None) -> CalibrationFile:
    """The calibration file (:func:`calibration_path` if None); none there is an empty one.
    Anything malformed is a one-line :class:`UserError` naming the file."""
    from dsplan.inputs.reading import path_kind, read_json

    path = Path(path) if path is not None else calibration_path()
    if path_kind(path) is None and not _is_link(path):  # none there (a dangling link is an error)
        return CalibrationFile(path)
    data = read_json(path, f"calibration file {path}")
    try:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if data.get("version") != VERSION:
            raise ValueError(f"version {excerpt(data.get('version'), 20)} is not {VERSION}")
        if not isinstance(data.get("entries"), dict):
            raise ValueError("entries must be an object")
        entries = [_entry(raw, name, path) for name, raw in data["entries"].items()]
    except ValueError as e:
        raise UserError(f"calibration file {path}: {e} (fix it, or remove it to use dsplan's defaults)") from None
    models = data.get("models") if isinstance(data.get("models"), dict) else {}
    return CalibrationFile(path, {e.key: e for e in entries}, models)


def lookup_calibration(profile) -> Entry | None:
    """The calibration entry for this hardware profile, from the user's calibration file."""
    return load_calibration().lookup(profile)


def unmatched_why(profile, path: Path | None = None) -> str | None:
    """A line for a plan that found no entry for its card while the file has entries for its
    backend (a plan without ``--gpu-name`` is card ``unknown``): it names them and the flag that
    selects one.  None otherwise (a malformed file too: the lookup before the plan reports it)."""
    try:
        cal = load_calibration(path)
    except UserError:
        return None
    if cal.lookup(profile) is not None:
        return None
    mine = [e.card for e in cal.entries.values() if e.backend == profile.backend]
    cards = sorted(c for c in mine if c != UNKNOWN_CARD)
    if not cards:
        return (f"{cal.path} has a calibration for {profile.backend}/{UNKNOWN_CARD} (runs without a card name); "
                "it applies only to plans without --gpu-name") if mine else None
    card = card_name(profile.gpu_name)
    this = "the plan has no --gpu-name" if card == UNKNOWN_CARD else f"this plan's card is {card}"
    named = ", ".join(f"{profile.backend}/{c}" for c in cards[:6]) + (f" and {len(cards) - 6} more"
                                                                      if len(cards) > 6 else "")
    return (f"{cal.path} has calibrations for {named} but none for this card ({this}); if the GPUs are one of "
            f"those, pass --gpu-name (e.g. --gpu-name {cards[0]}) to use its calibration")


# ---------------------------------------------------------------------------- the fit
def predict(s: Sample, rt: Runtime) -> float:
    """What the sample's estimate, made with ``rt``, says the caching allocator reserves: the
    estimate less the context and NCCL buffers, which are outside it (:mod:`dsplan.learn.compare`;
    that is the modelled parts plus :meth:`Runtime.allocator`, raised by the headroom shift)."""
    figures = with_runtime(s.base_bytes, s.stage, s.transient_bytes, s.world_size, rt)
    return figures.comparable(OOM_BOUND if s.is_bound else RESERVED)


def residuals(samples: list[Sample], rt: Runtime) -> dict | None:
    """Median absolute and worst (largest in size, signed) relative error over the measured peaks."""
    errors = [(predict(s, rt) - s.measured_bytes) / s.measured_bytes for s in samples if not s.is_bound]
    if not errors:
        return None
    return {"median": round(statistics.median(abs(e) for e in errors), 6),
            "worst": round(max(errors, key=abs), 6)}


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when the system is (nearly) singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    scale = max((abs(v) for row in a for v in row), default=0.0) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-9 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _least_squares(rows: list[list[float]], ys: list[float], weights: list[float]) -> list[float] | None:
    """Weighted least squares through the normal equations (a handful of unknowns)."""
    k = len(rows[0])
    ata = [[sum(w * r[i] * r[j] for r, w in zip(rows, weights)) for j in range(k)] for i in range(k)]
    aty = [sum(w * r[i] * y for r, y, w in zip(rows, ys, weights)) for i in range(k)]
    return _solve(ata, aty)


def separable_stages(measured: list[Sample]) -> tuple[int, ...]:
    """The ZeRO stages whose runs have two or more transient sizes (:data:`DISTINCT_TRANSIENT` apart):
    only for those can least squares tell the slack from ``extra``."""
    out = []
    for st in sorted({s.stage for s in measured}):
        ts = [s.transient_bytes for s in measured if s.stage == st]
        if max(ts) > (1 + DISTINCT_TRANSIENT) * min(ts):
            out.append(st)
    return tuple(out)


def _fit_coefficients(measured: list[Sample], default: Runtime) -> tuple[Runtime, tuple[int, ...]]:
    """``extra`` and the slack of each separable stage from the measured peaks (GiB inside), and the
    stages whose slack was solved (none when the system is singular: then only ``extra`` is fitted)."""
    stages = separable_stages(measured)
    ts = [s.transient_bytes / GiB for s in measured]
    # a stage whose slack is not fitted keeps its default share of the peak
    ys = [(s.measured_bytes - s.base_bytes) / GiB - (0.0 if s.stage in stages else default.slack[s.stage] * t)
          for s, t in zip(measured, ts)]
    weights = [(GiB / s.measured_bytes) ** 2 for s in measured]
    x = None
    if stages:
        rows = [[1.0] + [t if s.stage == st else 0.0 for st in stages] for s, t in zip(measured, ts)]
        x = _least_squares(rows, ys, weights)
    slack = dict(default.slack)
    if x is not None:
        slack.update({st: min(MAX_SLACK, max(0.0, v)) for st, v in zip(stages, x[1:])})
    fitted = stages if x is not None else ()
    # the extra that best fits with these slacks (the same as x[0] unless a slack was clamped)
    rest = [(s.measured_bytes - s.base_bytes) / GiB - slack[s.stage] * t for s, t in zip(measured, ts)]
    extra = sum(w * r for w, r in zip(weights, rest)) / sum(weights)
    return replace(default, slack=slack, extra_bytes=int(min(MAX_EXTRA, max(0.0, extra * GiB)))), fitted


def _cover_bounds(rt: Runtime, bounds: list[Sample]) -> Runtime:
    """Raise ``extra`` until no OOM is predicted below the memory it is known to have needed."""
    short = max((s.lower_bound - predict(s, rt) for s in bounds), default=0.0)
    if short <= 0:
        return rt
    return replace(rt, extra_bytes=int(min(MAX_EXTRA, rt.extra_bytes + math.ceil(short))))


def _headroom_shift(samples: list[Sample], rt: Runtime) -> float:
    """The worst relative underestimate: measured peaks, and OOM lower bounds (0 when none is under)."""
    worst = max(((s.measured_bytes if not s.is_bound else s.lower_bound) / predict(s, rt) - 1 for s in samples),
                default=0.0)
    return min(MAX_SHIFT, max(0.0, worst))


def _under(samples: list[Sample], rt: Runtime) -> int:
    """How many OOM samples ``rt`` predicts below the memory they are known to have needed."""
    return sum(1 for s in samples if s.is_bound and predict(s, rt) < s.lower_bound)


def _likely_cause(samples: list[Sample], errors: list[float]) -> str:
    """Why the runs and the model disagree, from the signs of the errors and how the estimates sized
    their rows."""
    over = sum(e > DISAGREE_MEDIAN for e in errors)
    under = sum(e < -DISAGREE_MEDIAN for e in errors)
    measured = [s for s in samples if not s.is_bound]
    at_cutoff = sum(s.planned_at == "cutoff_len" for s in measured)
    unknown = sum(s.planned_at is None for s in measured)
    if over and under:
        return (f"the runs disagree with each other too ({over} far below the estimate, {under} far above): runs of "
                "different settings or models under one card, or a setting the model does not tell apart")
    if under:
        return ("the runs need more than the modelled parts plus the fitted extra and slack: a part the model lacks "
                "or under-sizes (`dsplan report RUN_DIR` names the largest transient part of each run)")
    if at_cutoff:
        return (f"{at_cutoff} of {len(measured)} estimates sized every row at cutoff_len; real batches shorter than "
                "that peak lower: plan with --dataset so the estimate uses the data's real lengths")
    if unknown:
        return (f"{unknown} of {len(measured)} runs do not record how their estimate sized its rows (an older "
                "dsplan); rows shorter than cutoff_len would explain peaks this far below the estimate")
    return ("the modelled parts are above what these runs allocated, and a calibration never goes below them "
            "(extra and slack stop at 0): `dsplan report RUN_DIR` shows the parts")


def disagreement(samples: list[Sample], rt: Runtime) -> str | None:
    """A warning when the median |error| of ``rt`` over the measured peaks is above :data:`DISAGREE_MEDIAN`."""
    errors = [(predict(s, rt) - s.measured_bytes) / s.measured_bytes for s in samples if not s.is_bound]
    if not errors or statistics.median(abs(e) for e in errors) <= DISAGREE_MEDIAN:
        return None
    return (f"the runs disagree with the model: median |error| {statistics.median(abs(e) for e in errors):.0%} "
            f"after calibrating (over {DISAGREE_MEDIAN:.0%}); likely cause: {_likely_cause(samples, errors)}")


# ---------------------------------------------------------------------------- one card
@dataclass
class Result:
    """One backend and card's calibration: the entry before and after, and what it came from."""

    key: str
    new: Entry
    old: Runtime  # what the estimate used before (the old entry's, else dsplan's defaults)
    had_entry: bool
    skipped: dict[str, int]
    how: str = "fit"  # "fit", "headroom", or "checked": few new samples checked an earlier fit
    sampled_stages: tuple[int, ...] = ()  # the ZeRO stages the measured peaks cover
    counts: tuple[int, int] = (0, 0)  # this calibration's measured peaks and OOM bounds
    bounds_under_before: int = 0  # OOMs the old coefficients predicted below the memory they needed
    bounds_under_after: int = 0

    def to_json(self) -> dict:
        return {"key": self.key, "backend": self.new.backend, "card": self.new.card, "kind": self.new.kind,
                "how": self.how, "samples_used": sum(self.counts), "measured": self.counts[0],
                "oom_bounds": self.counts[1], "runs_in_entry": self.new.runs, "skipped": self.skipped,
                "old": _runtime_json(self.old), "new": _runtime_json(self.new.runtime), "residuals": self.new.residuals,
                "fitted_stages": list(self.new.fitted_stages) if self.how == "fit" else [],
                "warning": self.new.warning,
                "oom_bounds_under": {"before": self.bounds_under_before, "after": self.bounds_under_after}}


def _runtime_json(rt: Runtime) -> dict:
    return {"context_bytes": rt.context_bytes, "nccl_bytes": rt.nccl_bytes, "extra_bytes": rt.extra_bytes,
            "slack": {str(s): round(v, 6) for s, v in sorted(rt.slack.items())},
            "headroom_shift": round(rt.headroom_shift, 6), "source": rt.source}


def _new_runtime(samples: list[Sample], had: Entry | None) -> tuple[str, Runtime, tuple[int, ...]]:
    """(how, runtime, fitted stages): a fit from three measured peaks or more; else a headroom check of
    the card's earlier fit; else a headroom shift of dsplan's defaults."""
    default = Runtime.default(samples[0].backend)
    measured = [s for s in samples if not s.is_bound]
    if len(measured) >= MIN_FIT_RUNS:
        rt, stages = _fit_coefficients(measured, default)
        return "fit", _cover_bounds(rt, [s for s in samples if s.is_bound]), stages
    if had is not None and had.kind == "fit":
        fitted = replace(had.runtime, headroom_shift=0.0)
        shift = max(had.runtime.headroom_shift, _headroom_shift(samples, fitted))
        return "checked", replace(had.runtime, headroom_shift=shift), had.fitted_stages
    return "headroom", replace(default, headroom_shift=_headroom_shift(samples, default)), ()


def _listed(sources: list[str]) -> tuple[str, ...]:
    listed = list(dict.fromkeys(sources))
    if len(listed) > MAX_SOURCES:
        listed = listed[:MAX_SOURCES] + [f"... and {len(listed) - MAX_SOURCES} more"]
    return tuple(listed)


def fit_card(samples: list[Sample], had: Entry | None, site: str | None, sources: list[str]) -> tuple[Entry, str]:
    """The new entry for one backend and card from its samples (``had``: the card's entry in the file,
    whose runtime the residuals before are of), and how it was made (see :func:`_new_runtime`)."""
    first = samples[0]
    old = had.runtime if had is not None else Runtime.default(first.backend)
    how, rt, stages = _new_runtime(samples, had)
    runs, measured = len(samples), sum(not s.is_bound for s in samples)
    if how == "checked":  # the fit's own runs still stand behind it
        runs, measured = runs + had.runs, measured + had.measured
        sources = [s for s in had.sources if not s.startswith("... and ")] + sources
    entry = Entry(first.backend, first.card, "headroom" if how == "headroom" else "fit", rt, runs, measured,
                  runs - measured, had.site if how == "checked" and site is None else site, _listed(sources),
                  {"before": residuals(samples, old), "after": residuals(samples, rt)},
                  datetime.now(timezone.utc).isoformat(timespec="seconds"), fitted_stages=stages,
                  warning=disagreement(samples, rt))
    return entry, how


def calibrate(found: Samples, site: str | None = None, path: Path | None = None) -> tuple[list[Result], Path]:
    """Fit every backend and card the samples cover and write them into the calibration file
    (merged: other entries stay).  No usable sample is a :class:`UserError`; nothing is written then."""
    from dsplan.fsutil import atomic_write

    if not found.samples:
        reasons = "; ".join(f"{r} ({n})" for r, n in found.skip_reasons().most_common(3))
        raise UserError("no usable calibration sample in " + ", ".join(found.sources)
                        + (f": skipped {reasons}" if reasons else ": no attempts recorded"))
    current = load_calibration(path)
    groups: dict[str, list[Sample]] = {}
    for s in found.samples:
        groups.setdefault(s.key, []).append(s)
    results = []
    for key, samples in sorted(groups.items()):
        had = current.entries.get(key)
        old = had.runtime if had is not None else Runtime.default(samples[0].backend)
        sources = list(dict.fromkeys(s.where.rsplit(" ", 2)[0] for s in samples))
        entry, how = fit_card(samples, had, site, sources)
        entry = replace(entry, path=current.path, runtime=replace(entry.runtime, source=str(current.path)))
        sampled = tuple(sorted({s.stage for s in samples if not s.is_bound}))
        counts = (sum(not s.is_bound for s in samples), sum(s.is_bound for s in samples))
        results.append(Result(key, entry, old, had is not None, dict(found.skip_reasons(key)), how, sampled,
                              counts, _under(samples, old), _under(samples, entry.runtime)))
        current.entries[key] = entry
    try:
        atomic_write(current.path, current.to_text())
    except OSError as e:
        raise UserError(f"cannot write calibration file {current.path}: {e.strerror or e}") from None
    return results, current.path


# ---------------------------------------------------------------------------- output
def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "0.0%" if abs(value) < 0.0005 else f"{value:+.1%}"


def _errors(res: dict) -> str:
    before, after = res.get("before"), res.get("after")
    if not before or not after:
        return "error vs measured peaks: n/a (OOM bounds only)"
    return (f"error vs measured peaks: median {before['median']:.1%} -> {after['median']:.1%}, worst "
            f"{_pct(before['worst'])} -> {_pct(after['worst'])} (estimate - measured; negative: underestimate)")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _how_line(r: Result) -> str:
    """What was fitted, naming only the stages whose slack was solved."""
    e = r.new
    if r.how == "headroom":
        return (f"  headroom only: {_plural(e.measured, 'measured peak')}, a fit needs {MIN_FIT_RUNS}; every GPU "
                f"estimate for {r.key} is raised {e.runtime.headroom_shift:.1%}")
    if r.how == "checked":
        return (f"  kept the fit of the earlier entry ({_plural(e.runs - sum(r.counts), 'run')}): "
                f"{_plural(r.counts[0], 'measured peak')} cannot refit it (a fit needs {MIN_FIT_RUNS}), so the fit "
                f"was only checked against them: headroom shift {r.old.headroom_shift:.1%} -> "
                f"{e.runtime.headroom_shift:.1%} on top "
                "of the fitted coefficients")
    solved = [f"ZeRO-{s}" for s in e.fitted_stages]
    kept = [f"ZeRO-{s} ({'no runs' if s not in r.sampled_stages else 'its runs do not separate slack from extra'})"
            for s in STAGES if s not in e.fitted_stages]
    what = f"extra and the allocator slack of {', '.join(solved)}" if solved else "extra only"
    return (f"  fit: {what} by least squares (the context is outside the measured allocator peaks and keeps its "
            "value)" + (f"; slack kept at dsplan's default for {', '.join(kept)}" if kept else ""))


def _describe_one(r: Result) -> list[str]:
    e = r.new
    skipped = "; ".join(f"{why}: {n}" for why, n in sorted(r.skipped.items()))
    lines = [f"{r.key}: {_plural(sum(r.counts), 'sample')} used ({_plural(r.counts[0], 'measured peak')}, "
             f"{_plural(r.counts[1], 'OOM bound')}), {sum(r.skipped.values())} skipped"
             + (f" ({skipped})" if skipped else ""), _how_line(r)]
    lines.append(f"  old: {describe_runtime(r.old)}"
                 + ("" if r.had_entry else " (dsplan's defaults)"))
    lines.append(f"  new: {describe_runtime(e.runtime)}")
    lines.append(f"  {_errors(e.residuals)}")
    if r.counts[1]:
        lines.append(f"  OOM bounds: the old coefficients predicted {r.bounds_under_before} of {r.counts[1]} below "
                     f"the memory the OOM needed, the new {r.bounds_under_after}")
    if e.warning:
        lines.append(f"  WARNING: {e.warning}; the entry was written anyway, with this warning: check it before "
                     "relying on it")
    return lines


def describe(results: list[Result], path: Path, found: Samples) -> list[str]:
    """``dsplan calibrate``'s report: per backend and card, then the records no card claims, then the file."""
    lines = [line for r in results for line in _describe_one(r)]
    loose = found.skip_reasons(None) - sum((found.skip_reasons(r.key) for r in results), Counter())
    if loose:
        lines.append(f"skipped, not counted for a card: {sum(loose.values())} ("
                     + "; ".join(f"{why}: {n}" for why, n in sorted(loose.items())) + ")")
    lines.append(f"wrote {path}")
    return lines
