"""scripts/fit_public_figures.py: the runtime overhead fitted to the public peaks, judged by cross-validation.

Torch-free and fast.  The fit on the real table stays finite and within calibration's
clamps; on made-up points it recovers the coefficients they were made with; the
cross-validation's folds are checked by construction never to train on what they hold out;
and every figure of the summary is recomputed here from the rows.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from dsplan.estimate.estimate import Runtime
from dsplan.learn.calibration import MAX_CONTEXT, MAX_SLACK
from dsplan.units import GiB
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]


fpf = load_script("fit_public_figures")
DEFAULT = Runtime.default("cuda")


@pytest.fixture(scope="module")
def points():
    return fpf.points_from_table(fpf.bench.load())


@pytest.fixture(scope="module")
def result():
    return fpf.run()


def _within_clamps(rt: Runtime) -> bool:
    c = fpf.coefficients(rt)
    return (all(math.isfinite(v) for v in c.values()) and 0 <= rt.context_bytes <= MAX_CONTEXT
            and all(0 <= rt.slack[s] <= MAX_SLACK for s in (2, 3)))


def _point(i, kind, stage, transient_gib, base_gib=10.0, world_size=1, source="s", measured=None, card_gib=80.0):
    return fpf.FitPoint(id=f"p{i}", source=source, framework="x", kind=kind, stage=stage, world_size=world_size,
                        base=base_gib * GiB, transient=transient_gib * GiB, measured=measured, card=card_gib * GiB)


def _made_up(context_gib=1.5, slack=None):
    """Points whose measurements follow the model exactly, for known coefficients."""
    slack = slack or {2: 0.4, 3: 0.9}
    truth = Runtime(int(context_gib * GiB), DEFAULT.nccl_bytes, slack)
    specs = [("nvidia-smi", 2, 2.0, 1), ("nvidia-smi", 2, 9.0, 8), ("nvidia-smi", 3, 4.0, 8),
             ("nvidia-smi", 3, 12.0, 2), (fpf.RESERVED, 2, 5.0, 1), (fpf.RESERVED, 3, 7.0, 1),
             (fpf.ALLOCATED, 2, 3.0, 1)]
    pts = []
    for i, (kind, stage, t, ws) in enumerate(specs):
        p = _point(i, kind, stage, t, base_gib=10.0 + i, world_size=ws, source=f"src{i % 3}")
        pts.append(fpf.FitPoint(**{**p.__dict__, "measured": fpf.predict(p, truth)}))
    return pts, truth


# ---------------------------------------------------------------------------- the fit
def test_fit_on_the_table_is_finite_and_within_clamps(points):
    for kinds in (fpf.DEFAULT_TRAIN_KINDS, fpf.DEFAULT_TRAIN_KINDS + ("unspecified",)):
        for params in (fpf.PARAMS, ("slack2", "slack3"), ("slack2",)):
            rt = fpf.fit(points, DEFAULT, kinds, params)
            assert _within_clamps(rt), (kinds, params, fpf.coefficients(rt))
            for n in set(fpf.PARAMS) - set(params):  # what is not fitted keeps the default
                assert fpf.coefficients(rt)[n] == pytest.approx(fpf.coefficients(DEFAULT)[n])
            assert rt.nccl_bytes == DEFAULT.nccl_bytes


def test_every_fold_is_finite_and_within_clamps(result):
    for scheme in ("loo", "loso"):
        for f in result["folds"][scheme]:
            c = f["coefficients"]
            assert 0 <= c["context"] <= MAX_CONTEXT / GiB and all(0 <= c[s] <= MAX_SLACK for s in ("slack2", "slack3"))
            assert all(math.isfinite(v) for v in c.values())


def test_fit_recovers_the_coefficients_points_were_made_with():
    pts, truth = _made_up()
    rt = fpf.fit(pts, DEFAULT)
    assert rt.context_bytes / GiB == pytest.approx(truth.context_bytes / GiB, abs=1e-6)
    assert rt.slack[2] == pytest.approx(0.4, abs=1e-9) and rt.slack[3] == pytest.approx(0.9, abs=1e-9)
    for p in pts:
        assert fpf.error(p, rt) == pytest.approx(0.0, abs=1e-9)


def test_reserved_points_carry_no_context_and_allocated_points_no_overhead():
    p = _point(0, fpf.RESERVED, 2, 4.0, world_size=8)
    rt = Runtime(3 * GiB, GiB, {2: 0.5, 3: 1.0})
    assert fpf.predict(p, rt) == pytest.approx(10 * GiB + 2 * GiB)
    total = fpf.FitPoint(**{**p.__dict__, "kind": "nvidia-smi"})
    assert fpf.predict(total, rt) == pytest.approx(10 * GiB + 3 * GiB + GiB + 2 * GiB)
    alloc = fpf.FitPoint(**{**p.__dict__, "kind": fpf.ALLOCATED})
    assert fpf.predict(alloc, rt) == 10 * GiB
    # only reserved points: the context is not informed and keeps the default
    pts, _ = _made_up()
    reserved_only = [q for q in pts if q.kind == fpf.RESERVED]
    assert fpf.fit(reserved_only, DEFAULT).context_bytes == DEFAULT.context_bytes


def test_untrained_kinds_do_not_move_the_fit():
    pts, _ = _made_up()
    noisy = [fpf.FitPoint(**{**q.__dict__, "measured": q.measured * 3}) if q.kind == fpf.ALLOCATED else q for q in pts]
    noisy.append(_point(99, fpf.OOM, 2, 1.0, card_gib=1.0))
    assert fpf.coefficients(fpf.fit(noisy, DEFAULT)) == pytest.approx(fpf.coefficients(fpf.fit(pts, DEFAULT)))


def test_a_slack_pushed_below_zero_is_clamped_and_the_rest_refitted():
    # stage 2 measured below its base: its least-squares slack is negative, clamped to 0;
    # the context is then refitted with slack2 = 0 (the stage-3 points fix slack3 alone)
    truth = Runtime(int(2 * GiB), DEFAULT.nccl_bytes, {2: 0.0, 3: 0.5})
    pts = []
    for i, (stage, t) in enumerate([(2, 2.0), (2, 6.0), (3, 3.0), (3, 9.0)]):
        p = _point(i, "nvidia-smi", stage, t)
        m = fpf.predict(p, truth) - (0.1 * t * GiB if stage == 2 else 0)
        pts.append(fpf.FitPoint(**{**p.__dict__, "measured": m}))
    rt = fpf.fit(pts, DEFAULT)
    assert rt.slack[2] == 0.0
    assert _within_clamps(rt) and rt.slack[3] > 0


def test_with_the_defaults_every_error_is_the_bench_s(result):
    bench_rows, _ = fpf.bench.run_all()
    by_id = {r["id"]: r for r in bench_rows}
    assert [r["id"] for r in result["rows"]] == [r["id"] for r in bench_rows]
    for r in result["rows"]:
        b = by_id[r["id"]]
        if r["kind"] == fpf.OOM:
            assert r["before"]["called_fitting"] == (not b["agrees"])
            assert r["before"]["fits_plan"] == b["fits_plan"]
        else:
            assert r["before"]["error"] == pytest.approx(b["error"], abs=1e-6), r["id"]


# ---------------------------------------------------------------------------- cross-validation
@pytest.mark.parametrize("scheme", ["loo", "loso"])
def test_a_fold_never_trains_on_what_it_holds_out(points, scheme):
    seen: list[tuple[str, ...]] = []

    def spy(train):
        seen.append(tuple(p.id for p in train))
        return Runtime(DEFAULT.context_bytes, DEFAULT.nccl_bytes, dict(DEFAULT.slack), source=f"fold{len(seen) - 1}")

    held_rt, records = fpf.cross_validate(points, scheme, spy)
    folds = fpf.folds(points, scheme)
    assert len(seen) == len(folds) == len(records)
    all_ids = [p.id for p in points]
    for k, ((name, held), trained) in enumerate(zip(folds, seen)):
        held_ids = {points[i].id for i in held}
        assert not held_ids & set(trained)
        assert sorted(trained) == sorted(i for i in all_ids if i not in held_ids)  # and on everything else
        for i in held:  # each held-out point is predicted by its own fold's fit
            assert held_rt[i].source == f"fold{k}"
        if scheme == "loso":
            sources = {points[i].source for i in held}
            assert sources == {name}
            assert all(p.source != name for p in points if p.id in trained)
    covered = sorted(i for _, held in folds for i in held)
    assert covered == list(range(len(points)))  # every point held out exactly once
    if scheme == "loo":
        assert all(len(held) == 1 for _, held in folds)


def test_a_fold_holding_out_no_training_point_is_the_full_fit(points):
    rts, _ = fpf.cross_validate(points, "loo", lambda t: fpf.fit(t, DEFAULT))
    full = fpf.coefficients(fpf.fit(points, DEFAULT))
    for p, rt in zip(points, rts):
        if p.kind not in fpf.DEFAULT_TRAIN_KINDS:  # not a training point: its fold is the full fit
            assert fpf.coefficients(rt) == pytest.approx(full)


# ---------------------------------------------------------------------------- summary and decision
def _stats_by_hand(rows, scheme):
    errs = [r[scheme]["error"] for r in rows if r[scheme]["error"] is not None]
    if not errs:
        return None
    return statistics.median(abs(e) for e in errs), max(abs(e) for e in errs), len(errs)


def test_summary_is_computed_from_the_rows(result):
    rows, s = result["rows"], result["summary"]
    for scheme in ("before", "loo", "loso"):
        for label, sel, st in ([("all", rows, s[scheme]["all"]),
                                ("trained", [r for r in rows if r["kind"] in result["train_kinds"]],
                                 s[scheme]["trained_kinds"])]
                               + [(k, [r for r in rows if r["kind"] == k], s[scheme]["by_kind"][k])
                                  for k in fpf.ERROR_KINDS]
                               + [(src, [r for r in rows if r["source"] == src], st2)
                                  for src, st2 in s[scheme]["by_source"].items()]):
            hand = _stats_by_hand(sel, scheme)
            if hand is None:
                assert st["points"] == 0, label
                continue
            assert (st["median_abs"], st["worst_abs"], st["points"]) == pytest.approx(hand), (scheme, label)
        ooms = [r for r in rows if r["kind"] == fpf.OOM]
        assert s[scheme]["oom"]["points"] == len(ooms) == 8
        assert s[scheme]["oom"]["called_fitting"] == sum(r[scheme]["called_fitting"] for r in ooms)
        assert s[scheme]["oom"]["fits_plan"] == sum(r[scheme]["fits_plan"] for r in ooms)
    # a held-out row's figures are its fold's prediction
    for r in rows:
        for scheme in ("loo", "loso"):
            c = r[scheme]
            if r["measured_gib"] is not None:
                assert c["error"] == pytest.approx((c["predicted_gib"] - r["measured_gib"]) / r["measured_gib"])
            else:
                assert c["called_fitting"] == (c["predicted_gib"] <= r["card_gib"])


def test_source_changes_are_the_summary_s(result):
    s = result["summary"]
    for src, v in result["sources_loso"].items():
        assert v["before"] == s["before"]["by_source"][src]["median_abs"]
        assert v["after"] == s["loso"]["by_source"][src]["median_abs"]
        assert v["change"] == pytest.approx(v["after"] - v["before"])
        assert fpf.ALLOCATED not in v["kinds"] or len(v["kinds"]) > 1


def _summary(before_med, after_med, before_worst, after_worst, oom_before=2, oom_after=2):
    def st(med, worst):
        return {"median_abs": med, "worst_abs": worst}
    out = {"before": {"trained_kinds": st(before_med, before_worst), "all": st(before_med, before_worst),
                      "oom": {"called_fitting": oom_before}}}
    for scheme in ("loo", "loso"):
        out[scheme] = {"trained_kinds": st(after_med, after_worst), "all": st(after_med, after_worst),
                       "oom": {"called_fitting": oom_after}}
    return out


def test_decide_by_hand():
    two_better = {"a": {"change": -0.10}, "b": {"change": -0.03}, "c": {"change": 0.01}}
    assert fpf.decide(_summary(0.25, 0.15, 0.50, 0.40), two_better)["supported"]
    assert not fpf.decide(_summary(0.25, 0.24, 0.50, 0.40), two_better)["supported"]  # gain too small
    assert not fpf.decide(_summary(0.25, 0.15, 0.50, 0.60), two_better)["supported"]  # worst rises
    assert not fpf.decide(_summary(0.25, 0.15, 0.50, 0.40, 2, 3), two_better)["supported"]  # an OOM more fits
    one_better = {"a": {"change": -0.10}, "b": {"change": 0.0}}
    assert not fpf.decide(_summary(0.25, 0.15, 0.50, 0.40), one_better)["supported"]  # one source only
    much_worse = {**two_better, "d": {"change": 0.08}}
    d = fpf.decide(_summary(0.25, 0.15, 0.50, 0.40), much_worse)
    assert not d["supported"] and d["much_worse"] == ["d"]


def test_a_fit_that_improves_only_leaving_points_out_is_refused_by_that_one_check():
    """Both schemes must improve: LOO alone is not enough, and only the LOSO median check fails."""
    s = _summary(0.25, 0.15, 0.50, 0.40)
    s["loso"]["trained_kinds"] = {"median_abs": 0.25, "worst_abs": 0.40}
    d = fpf.decide(s, {"a": {"change": -0.10}, "b": {"change": -0.03}})
    assert not d["supported"]
    assert [name for name, ok in d["checks"].items() if not ok] == [
        f"loso: trained kinds' median |error| falls by {fpf.MIN_MEDIAN_GAIN:.0%}+"]


def test_cli_writes_json_and_prints_the_report(tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert fpf.main(["--json", str(out), "--fit", "slack2,slack3"]) == 0
    text = capsys.readouterr().out
    assert "held-out |error|" in text and "decision:" in text and "OOM reports called fitting" in text
    data = json.loads(out.read_text())
    assert data["fitted"] == ["slack2", "slack3"] and data["points"] == len(data["rows"])
    assert data["full_fit"]["context"] == pytest.approx(DEFAULT.context_bytes / GiB)
    with pytest.raises(SystemExit):
        fpf.main(["--train-kinds", "max_memory_allocated"])  # allocated peaks carry no overhead
