#!/usr/bin/env python3
"""Fit dsplan's runtime overhead (CUDA context, allocator slack per ZeRO stage) to the public
measured peaks, and judge the fit by cross-validation rather than by the points it was fitted to.

    python scripts/fit_public_figures.py [--data FILE] [--train-kinds K,K] [--fit P,P] [--rows] [--json OUT]

Each point of ``tests/data/public_peaks.yaml`` is rebuilt exactly as
``scripts/bench_public_figures.py`` builds it, and estimated once with dsplan's current
defaults.  The estimate splits into the part the runtime coefficients do not touch,
``base = gpu_bytes - overhead``, and the step's transient memory ``T``
(``Estimate.transient_bytes``).  With coefficients ``context``, ``nccl`` and ``slack[stage]``
the model of each kind of measurement is (``nccl`` only on more than one GPU):

* ``nvidia-smi`` (and ``unspecified``, which the bench compares the same way):
  ``base + context + nccl + slack[stage] * T``, the process total;
* ``max_memory_reserved``: ``base + slack[stage] * T``; the context and NCCL's buffers are
  not allocated through PyTorch's caching allocator;
* ``max_memory_allocated``: ``base``; it has no slack either, so these points cannot inform
  the fit.  They check the non-overhead terms and their error is the same before and after;
* ``oom_lower_bound``: the run died, so the total exceeded the card.  No error figure; a
  point is *called fitting* when the predicted total is at most the card's capacity (the
  bench's "fits!"), and *fitting by plan* when it is within the planner's headroom.

These are the bench's comparison rules: with the defaults, every error here equals the bench's.

The fit.  ``dsplan.learn.calibration._fit_coefficients`` fits only reserved-type figures (a
run's ledger holds ``vram_reserved``), so it fits an allocator ``extra`` and keeps the context;
here nvidia-smi totals, which do carry the context, are mixed with reserved peaks, so its
grouping does not suit.  The fit is therefore a small least squares of its own, built on
calibration's solver (``_least_squares``) and its clamps (``MAX_CONTEXT``, ``MAX_SLACK``):

    y = measured - base - nccl        (nccl: total-type points on more than one GPU)
    y ~ has_context * context + [stage == 2] * T * slack2 + [stage == 3] * T * slack3

``has_context`` is 1 for total-type points and 0 for reserved ones; each row is weighted by
1 / measured^2, so the squared *relative* error is minimised and a 7B and a 70B run count
alike (as in calibration).  ``nccl`` keeps dsplan's default.  A coefficient no training point
informs (no total-type point: context; no point of a stage: its slack) keeps the default.  A
coefficient that leaves its clamp is fixed at the bound and the rest solved again.  Only
``--train-kinds`` (default ``nvidia-smi`` and ``max_memory_reserved``) train; every point
with an error figure is evaluated.  All points are estimated as the bench does, on the
``cuda`` backend, so the fitted context is ``CONTEXT_BYTES["cuda"]``.  ``--fit`` names the
coefficients to fit (default all three); the others keep the defaults.

Cross-validation.  *Leave one out*: for each point, fit on every other point and predict
it.  *Leave one source out*: for each source (the ``source`` URL without its #fragment),
fit on the other sources' points and predict that source's; points from one page share its
way of measuring, so this is the honest test of a constant meant for everyone.  Errors are
(prediction - measured) / measured; negative is an underestimate.  "before" is dsplan's
current defaults, which were set by hand and are not refitted per fold.  The report gives,
per kind, the held-out median and worst |error| before and after; the coefficients of the
fit on all points and their spread over the folds; per source, the held-out median |error|
before and after; and how many OOM reports each calls fitting.

Decision (:func:`decide`): the cross-validation supports new defaults only when, under both
schemes, the trained kinds' held-out median |error| falls by at least
:data:`MIN_MEDIAN_GAIN`, the worst |error| over all points does not rise and no more OOM
reports are called fitting; and, leaving sources out, at least two sources get better and
none worse by more than :data:`MAX_SOURCE_LOSS`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsplan.codes import Component
from dsplan.estimate.estimate import Runtime, estimate
from dsplan.learn.calibration import MAX_CONTEXT, MAX_SLACK, _least_squares
from dsplan.learn.compare import (
    ALLOCATED,
    OOM_CARD,
    PROCESS_KINDS,
    RESERVED,
    UNSPECIFIED,
    with_runtime,
)
from dsplan.plan.planner import DEFAULT_HEADROOM
from dsplan.units import GiB


def _load_bench():
    """scripts/bench_public_figures.py as a module (the one already loaded, if any)."""
    if "bench_public_figures" in sys.modules:
        return sys.modules["bench_public_figures"]
    spec = importlib.util.spec_from_file_location("bench_public_figures", REPO / "scripts" / "bench_public_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

#: The kinds, as dsplan.learn.compare defines them (the process-total ones less the OOM reports).
TOTAL_KINDS = tuple(k for k in PROCESS_KINDS if k != OOM_CARD)
OOM = OOM_CARD
ERROR_KINDS = (*TOTAL_KINDS, RESERVED, ALLOCATED)
DEFAULT_TRAIN_KINDS = tuple(k for k in TOTAL_KINDS if k != UNSPECIFIED) + (RESERVED,)
BACKEND = "cuda"
PARAMS = ("context", "slack2", "slack3")


@dataclass(frozen=True)
class FitPoint:
    """One public point in the fit's terms (bytes).  ``measured`` is None for an OOM report,
    whose ``card`` capacity is then the lower bound of its demand."""

    id: str
    source: str
    framework: str
    kind: str
    stage: int
    world_size: int
    base: float
    transient: float
    measured: float | None
    card: float


def source_key(url: str) -> str:
    return url.split("#", 1)[0]


def points_from_table(data: dict) -> list[FitPoint]:
    """Every point of the data file, estimated once with dsplan's defaults and split into
    base and transient memory."""
    out = []
    for p in data["points"]:
        b = bench.build(p, data)
        est = estimate(b.spec, b.hw, b.tier, b.workload, b.zero)
        kind = p["measured"]["kind"]
        out.append(FitPoint(
            id=p["id"], source=source_key(p["source"]), framework=p["framework"], kind=kind,
            stage=b.tier.stage, world_size=b.hw.world_size,
            base=float(est.gpu_bytes - est.gpu.get(Component.OVERHEAD, 0)), transient=float(est.transient_bytes),
            measured=None if kind == OOM else bench.measured_bytes(p["measured"]), card=float(b.hw.gpu_mem)))
    return out


# ---------------------------------------------------------------------------- model and fit
def predict(p: FitPoint, rt: Runtime) -> float:
    """What the point's kind of measurement would read, had dsplan used ``rt``: the estimate rebuilt
    with ``rt``'s overhead, compared by :mod:`dsplan.learn.compare`'s rule for the kind."""
    return with_runtime(p.base, p.stage, p.transient, p.world_size, rt).comparable(p.kind)


def error(p: FitPoint, rt: Runtime) -> float | None:
    return None if p.measured is None else (predict(p, rt) - p.measured) / p.measured


def called_fitting(p: FitPoint, rt: Runtime, headroom: float = 0.0) -> bool:
    """An OOM point the prediction says fits its card (with ``headroom``: as plan would)."""
    return predict(p, rt) <= p.card * (1 - headroom)


def _bounds(name: str) -> tuple[float, float]:
    return (0.0, MAX_CONTEXT / GiB) if name == "context" else (0.0, MAX_SLACK)


def _get(rt: Runtime, name: str) -> float:
    return rt.context_bytes / GiB if name == "context" else rt.slack[int(name[-1])]


def fit(train: Sequence[FitPoint], default: Runtime, kinds: Sequence[str] = DEFAULT_TRAIN_KINDS,
        params: Sequence[str] = PARAMS) -> Runtime:
    """Context and slack per stage by weighted least squares on the relative error of the
    ``kinds`` points in ``train`` (see the module docstring); uninformed coefficients keep
    ``default``'s, fitted ones stay within calibration's clamps.  Only ``params`` are fitted;
    the others keep ``default``'s too."""
    used = [p for p in train if p.kind in kinds and p.kind in TOTAL_KINDS + (RESERVED,) and p.measured]
    cols = []  # per point: each coefficient's column (GiB)
    for p in used:
        ctx = 1.0 if p.kind in TOTAL_KINDS else 0.0
        t = p.transient / GiB
        cols.append({"context": ctx, "slack2": t if p.stage == 2 else 0.0, "slack3": t if p.stage == 3 else 0.0})
    ys = [(p.measured - p.base - (default.nccl_bytes if p.kind in TOTAL_KINDS and p.world_size > 1 else 0)) / GiB
          for p in used]
    weights = [(GiB / p.measured) ** 2 for p in used]
    values = {n: _get(default, n) for n in PARAMS}
    free = [n for n in PARAMS if n in params and any(c[n] != 0.0 for c in cols)]
    while free:
        rows = [[c[n] for n in free] for c in cols]
        rhs = [y - sum(c[n] * values[n] for n in PARAMS if n not in free) for c, y in zip(cols, ys)]
        x = _least_squares(rows, rhs, weights)
        if x is None:  # cannot separate them: keep the default context, fit the slacks
            if "context" in free:
                free.remove("context")
                continue
            break
        out = [(n, v) for n, v in zip(free, x) if not _bounds(n)[0] <= v <= _bounds(n)[1]]
        if not out:
            values.update(zip(free, x))
            break
        # fix the coefficient furthest outside its clamp at the bound, solve for the rest
        n, v = max(out, key=lambda nv: max(_bounds(nv[0])[0] - nv[1], nv[1] - _bounds(nv[0])[1]))
        values[n] = min(_bounds(n)[1], max(_bounds(n)[0], v))
        free.remove(n)
    return Runtime(round(values["context"] * GiB), default.nccl_bytes,
                   {2: values["slack2"], 3: values["slack3"]}, source="fit")


def coefficients(rt: Runtime) -> dict[str, float]:
    return {n: _get(rt, n) for n in PARAMS}


# ---------------------------------------------------------------------------- cross-validation
FitFn = Callable[[Sequence[FitPoint]], Runtime]


def folds(points: Sequence[FitPoint], scheme: str) -> list[tuple[str, list[int]]]:
    """(name, indices held out) for each fold: one point each (``loo``) or one source each (``loso``)."""
    if scheme == "loo":
        return [(p.id, [i]) for i, p in enumerate(points)]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault(p.source, []).append(i)
    return list(groups.items())


def cross_validate(points: Sequence[FitPoint], scheme: str, fit_fn: FitFn) -> tuple[list[Runtime | None], list[dict]]:
    """Per point, the runtime fitted without it (its fold); plus each fold's record.  The
    training set of a fold is built from the indices not held out, never from the held-out ones."""
    held_rt: list[Runtime | None] = [None] * len(points)
    records = []
    for name, held in folds(points, scheme):
        out = set(held)
        train = [p for i, p in enumerate(points) if i not in out]
        rt = fit_fn(train)
        for i in held:
            held_rt[i] = rt
        records.append({"fold": name, "held_out": [points[i].id for i in held], "trained_on": len(train),
                        "coefficients": coefficients(rt)})
    return held_rt, records


# ---------------------------------------------------------------------------- rows and summary
def make_rows(points: Sequence[FitPoint], default: Runtime, held: dict[str, list[Runtime | None]]) -> list[dict]:
    """One row per point: measured, and per scheme ("before" = the defaults) the prediction,
    the error and, for OOM reports, whether it is called fitting."""
    rows = []
    for i, p in enumerate(points):
        row = {"id": p.id, "source": p.source, "framework": p.framework, "kind": p.kind, "stage": p.stage,
               "world_size": p.world_size, "measured_gib": None if p.measured is None else p.measured / GiB,
               "card_gib": p.card / GiB, "base_gib": p.base / GiB, "transient_gib": p.transient / GiB}
        for scheme, rt in [("before", default)] + [(s, rts[i]) for s, rts in held.items()]:
            row[scheme] = {"predicted_gib": predict(p, rt) / GiB, "error": error(p, rt),
                           "called_fitting": called_fitting(p, rt) if p.kind == OOM else None,
                           "fits_plan": called_fitting(p, rt, DEFAULT_HEADROOM) if p.kind == OOM else None}
        rows.append(row)
    return rows


def _stats(rows: Sequence[dict], scheme: str) -> dict:
    errs = [(r["id"], r[scheme]["error"]) for r in rows if r[scheme]["error"] is not None]
    if not errs:
        return {"points": 0, "median_abs": None, "worst_abs": None, "worst_id": None, "median": None}
    wid, worst = max(errs, key=lambda e: abs(e[1]))
    return {"points": len(errs), "median_abs": statistics.median(abs(e) for _, e in errs),
            "worst_abs": abs(worst), "worst_id": wid, "median": statistics.median(e for _, e in errs)}


def summarize(rows: Sequence[dict], schemes: Sequence[str], train_kinds: Sequence[str]) -> dict:
    """Per scheme: errors overall, of the training kinds, per kind and per source; OOM counts."""
    out = {}
    sources = list(dict.fromkeys(r["source"] for r in rows))
    ooms = [r for r in rows if r["kind"] == OOM]
    for s in schemes:
        out[s] = {
            "all": _stats(rows, s),
            "trained_kinds": _stats([r for r in rows if r["kind"] in train_kinds], s),
            "by_kind": {k: _stats([r for r in rows if r["kind"] == k], s) for k in ERROR_KINDS},
            "by_source": {src: _stats([r for r in rows if r["source"] == src], s) for src in sources},
            "oom": {"points": len(ooms), "called_fitting": sum(bool(r[s]["called_fitting"]) for r in ooms),
                    "fits_plan": sum(bool(r[s]["fits_plan"]) for r in ooms),
                    "called_fitting_ids": [r["id"] for r in ooms if r[s]["called_fitting"]]},
        }
    return out


def spread(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    return {n: {"min": min(r["coefficients"][n] for r in records),
                "median": statistics.median(r["coefficients"][n] for r in records),
                "max": max(r["coefficients"][n] for r in records)} for n in PARAMS}


def source_changes(summary: dict, scheme: str, rows: Sequence[dict], train_kinds: Sequence[str]) -> dict:
    """Per source whose points the coefficients move (an error figure of a kind other than
    allocated): held-out median |error| under ``scheme`` against before."""
    out = {}
    for src, st in summary[scheme]["by_source"].items():
        kinds = {r["kind"] for r in rows if r["source"] == src and r["kind"] in ERROR_KINDS}
        if not st["points"] or kinds <= {ALLOCATED}:
            continue
        before = summary["before"]["by_source"][src]["median_abs"]
        out[src] = {"points": st["points"], "kinds": sorted(kinds), "trained": bool(kinds & set(train_kinds)),
                    "before": before, "after": st["median_abs"], "change": st["median_abs"] - before}
    return out


#: What "the held-out error improves clearly" means (fractions of the measured value).
MIN_MEDIAN_GAIN = 0.02  # the trained kinds' held-out median |error| falls by at least 2 points
SOURCE_BETTER = 0.005  # a source counts as better (worse) past half a point
MAX_SOURCE_LOSS = 0.05  # and no source's median |error| may rise by more than 5 points


def decide(summary: dict, changes: dict) -> dict:
    """Whether the cross-validation supports replacing the defaults with the fit, check by check."""
    checks = {}
    for scheme in ("loo", "loso"):
        b, a = summary["before"]["trained_kinds"], summary[scheme]["trained_kinds"]
        checks[f"{scheme}: trained kinds' median |error| falls by {MIN_MEDIAN_GAIN:.0%}+"] = (
            a["median_abs"] <= b["median_abs"] - MIN_MEDIAN_GAIN)
        checks[f"{scheme}: worst |error| of all points does not rise"] = (
            summary[scheme]["all"]["worst_abs"] <= summary["before"]["all"]["worst_abs"])
        checks[f"{scheme}: no more OOM reports called fitting"] = (
            summary[scheme]["oom"]["called_fitting"] <= summary["before"]["oom"]["called_fitting"])
    better = [s for s, v in changes.items() if v["change"] < -SOURCE_BETTER]
    worse = [s for s, v in changes.items() if v["change"] > MAX_SOURCE_LOSS]
    checks["loso: two or more sources better"] = len(better) >= 2
    checks[f"loso: no source worse by more than {MAX_SOURCE_LOSS:.0%}"] = not worse
    return {"supported": all(checks.values()), "checks": checks, "better": better, "much_worse": worse}


def run(data_path: Path = bench.DATA, train_kinds: Sequence[str] = DEFAULT_TRAIN_KINDS,
        params: Sequence[str] = PARAMS) -> dict:
    data = bench.load(data_path)
    points = points_from_table(data)
    default = Runtime.default(BACKEND)
    fit_fn: FitFn = lambda train: fit(train, default, train_kinds, params)
    full = fit_fn(points)
    held, records = {}, {}
    for scheme in ("loo", "loso"):
        held[scheme], records[scheme] = cross_validate(points, scheme, fit_fn)
    rows = make_rows(points, default, held)
    schemes = ("before", "loo", "loso")
    summary = summarize(rows, schemes, train_kinds)
    changes = source_changes(summary, "loso", rows, train_kinds)
    return {"data": str(data_path), "points": len(points), "sources": len({p.source for p in points}),
            "train_kinds": list(train_kinds), "fitted": list(params),
            "training_points": sum(p.kind in train_kinds and p.measured is not None for p in points),
            "default": coefficients(default), "full_fit": coefficients(full),
            "full_fit_in_sample": summarize(make_rows(points, full, {}), ("before",), train_kinds)["before"],
            "spread": {s: spread(records[s]) for s in ("loo", "loso")}, "folds": records,
            "rows": rows, "summary": summary, "sources_loso": changes, "decision": decide(summary, changes)}


# ---------------------------------------------------------------------------- printing
def _p(x: float | None) -> str:
    return "     -" if x is None else f"{100 * x:5.1f}%"


def _short(src: str) -> str:
    for prefix in ("https://github.com/", "https://gist.github.com/"):
        src = src.removeprefix(prefix)
    return src.replace("hiyouga/LlamaFactory/issues/", "LF#").split("/blob/")[0][:34]


def format_report(res: dict) -> str:
    s = res["summary"]
    out = [f"{res['points']} points from {res['sources']} sources; trained on {', '.join(res['train_kinds'])} "
           f"({res['training_points']} points)"
           + f"; fitting {', '.join(res['fitted'])}, the rest at the defaults; error = (predicted - measured) / measured", "",
           "coefficients     default   full fit   LOO min..median..max        LOSO min..median..max"]
    for n in PARAMS:
        unit = " GiB" if n == "context" else ""
        lo, ls = res["spread"]["loo"][n], res["spread"]["loso"][n]
        out.append(f"  {n + unit:<13} {res['default'][n]:8.3f} {res['full_fit'][n]:10.3f}   "
                   f"{lo['min']:6.3f}..{lo['median']:6.3f}..{lo['max']:6.3f}   "
                   f"{ls['min']:6.3f}..{ls['median']:6.3f}..{ls['max']:6.3f}")
    full = res["full_fit"]
    moved = [f for f in res["folds"]["loso"] if any(abs(f["coefficients"][n] - full[n]) > 1e-9 for n in PARAMS)]
    for f in moved:
        c = f["coefficients"]
        out.append(f"    LOSO without {_short(f['fold']):<30} context {c['context']:.3f}  slack2 {c['slack2']:.3f}"
                   f"  slack3 {c['slack3']:.3f}")
    out += ["", "held-out |error|: median / worst (n)   before (defaults)       LOO after             LOSO after"]
    groups = [("trained kinds", s["before"]["trained_kinds"], s["loo"]["trained_kinds"], s["loso"]["trained_kinds"])]
    groups += [(k, s["before"]["by_kind"][k], s["loo"]["by_kind"][k], s["loso"]["by_kind"][k]) for k in ERROR_KINDS]
    groups.append(("all", s["before"]["all"], s["loo"]["all"], s["loso"]["all"]))
    for label, *sts in groups:
        if not sts[0]["points"]:
            continue
        cells = "   ".join(f"{_p(st['median_abs'])} / {_p(st['worst_abs'])}" for st in sts)
        out.append(f"  {label:<22} ({sts[0]['points']:>2})   {cells}")
    out += ["", "per source, leave-one-source-out: median |error| before -> after"]
    for src, v in res["sources_loso"].items():
        mark = "better" if v["change"] < -0.005 else "worse" if v["change"] > 0.005 else "same"
        out.append(f"  {_short(src):<36} {v['points']:>2} pts  {','.join(v['kinds']):<30} "
                   f"{_p(v['before'])} -> {_p(v['after'])}  {mark}{'' if v['trained'] else ' (not trained on)'}")
    o = {k: s[k]["oom"] for k in ("before", "loo", "loso")}
    out += ["", (f"OOM reports called fitting (predicted total <= card), of {o['before']['points']}: "
                 f"before {o['before']['called_fitting']}, LOO {o['loo']['called_fitting']}, "
                 f"LOSO {o['loso']['called_fitting']}; within plan's {DEFAULT_HEADROOM:.0%} headroom: "
                 f"before {o['before']['fits_plan']}, LOO {o['loo']['fits_plan']}, LOSO {o['loso']['fits_plan']}")]
    for k in ("before", "loso"):
        out.append(f"  {k}: {', '.join(o[k]['called_fitting_ids']) or 'none'}")
    ins = res["full_fit_in_sample"]
    out += ["", (f"full fit in sample (not a validation): trained kinds median "
                 f"{_p(ins['trained_kinds']['median_abs'])} worst {_p(ins['trained_kinds']['worst_abs'])}; "
                 f"all median {_p(ins['all']['median_abs'])} worst {_p(ins['all']['worst_abs'])}; "
                 f"OOM called fitting {ins['oom']['called_fitting']}")]
    d = res["decision"]
    out += ["", "decision: " + ("the cross-validation supports new defaults" if d["supported"]
                                else "keep the defaults: the cross-validation does not support the fit")]
    out += [f"  [{'x' if ok else ' '}] {name}" for name, ok in d["checks"].items()]
    return "\n".join(out)


def format_rows(res: dict) -> str:
    head = f"{'id':<46} {'kind':<10} {'st':>2} {'meas':>6} {'T':>5} {'before':>7} {'LOO':>7} {'LOSO':>7}"
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        kind = {RESERVED: "reserved", ALLOCATED: "allocated", OOM: "OOM"}.get(r["kind"], r["kind"])
        cells = []
        for s in ("before", "loo", "loso"):
            c = r[s]
            cells.append(("fits!" if c["called_fitting"] else "no-fit") if r["kind"] == OOM
                         else f"{100 * c['error']:+.0f}%")
        meas = r["measured_gib"] if r["measured_gib"] is not None else r["card_gib"]
        lines.append(f"{r['id'][:46]:<46} {kind:<10} {r['stage']:>2} {meas:6.1f} {r['transient_gib']:5.1f} "
                     + " ".join(f"{c:>7}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=bench.DATA, help="points file (default: %(default)s)")
    ap.add_argument("--train-kinds", default=",".join(DEFAULT_TRAIN_KINDS),
                    help="measurement kinds the fit trains on, comma-separated (default: %(default)s; "
                         "'unspecified' may be added)")
    ap.add_argument("--fit", default=",".join(PARAMS),
                    help="coefficients to fit, comma-separated, the rest kept at the defaults (default: %(default)s)")
    ap.add_argument("--rows", action="store_true", help="also print one line per point")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the whole result as JSON")
    args = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in args.train_kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in TOTAL_KINDS + (RESERVED,)]
    if bad:
        ap.error(f"cannot train on {bad}: only {', '.join(TOTAL_KINDS + (RESERVED,))} carry the overhead")
    params = tuple(n.strip() for n in args.fit.split(",") if n.strip())
    if not params or set(params) - set(PARAMS):
        ap.error(f"--fit takes some of {', '.join(PARAMS)}")
    res = run(args.data, kinds, params)
    if args.rows:
        print(format_rows(res))
        print()
    print(format_report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    finite = all(math.isfinite(v) for rec in res["folds"].values() for f in rec for v in f["coefficients"].values())
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
