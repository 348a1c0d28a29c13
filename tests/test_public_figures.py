"""The public-figures regression table (tests/data/public_peaks.yaml) and its bench.

Torch-free and fast.  These tests check that every point is sourced and buildable,
that the bench produces a finite estimate for each, and that the summary is arithmetic
on the rows.  They deliberately assert no error threshold: the points are a regression
table to report against, not a target to fit (issue 13, item 5).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from dsplan.codes import Component
from dsplan.estimate.estimate import CONTEXT_BYTES, NCCL_BYTES, estimate
from dsplan.units import GiB
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]


bench = load_script("bench_public_figures")
DATA = bench.load()
POINTS = DATA["points"]
NUMBER = re.compile(r"\d+(?:\.\d+)?")


@pytest.fixture(scope="module")
def table():
    return bench.run_all()


def test_ids_are_unique_and_there_are_enough_points():
    ids = [p["id"] for p in POINTS]
    assert len(ids) == len(set(ids))
    assert len(POINTS) >= 25
    assert any(p["framework"] == bench.LF for p in POINTS)


@pytest.mark.parametrize("point", POINTS, ids=[p["id"] for p in POINTS])
def test_point_is_sourced_and_buildable(point):
    assert re.match(r"https://\S+$", point["source"]), point["source"]
    quote, figure = point["quote"], str(point["figure"])
    assert quote.strip() and figure.strip()
    assert figure in quote, "the figure must be quoted from the source"
    m = point["measured"]
    assert m["kind"] in bench.KINDS
    assert m["unit"] in bench.UNITS
    assert float(m["value"]) > 0
    assert int(m.get("per_gpu_of_sum", 1)) >= 1
    if m["kind"] == "oom_lower_bound":
        # the bound is the card's capacity, the same number the bench gives dsplan
        assert math.isclose(float(m["value"]) * bench.UNITS[m["unit"]], point["run"]["gpu_mem_gib"] * GiB)
    else:
        # the measured value is a number the quoted figure states
        assert any(math.isclose(float(n), float(m["value"])) for n in NUMBER.findall(figure)), figure
    assert isinstance(point["framework"], str) and point["framework"]
    assert point.get("notes"), "say what is assumed or unknown"
    built = bench.build(point, DATA)
    assert built.workload.cutoff_len > 0 and built.hw.world_size >= 1


def test_bench_gives_a_finite_estimate_for_every_point(table):
    rows, _ = table
    assert [r["id"] for r in rows] == [p["id"] for p in POINTS]
    for r in rows:
        assert math.isfinite(r["estimate_gib"]) and r["estimate_gib"] > 0, r["id"]
        assert math.isfinite(r["compared_gib"]) and r["compared_gib"] > 0, r["id"]
        if r["kind"] == "oom_lower_bound":
            assert r["error"] is None and isinstance(r["agrees"], bool)
        else:
            assert math.isfinite(r["error"]), r["id"]
            assert math.isclose(r["error"], (r["compared_gib"] - r["measured_gib"]) / r["measured_gib"])


def test_comparison_rule_per_kind():
    """nvidia-smi: the whole estimate; reserved: less context (and NCCL on several GPUs);
    allocated: less the whole overhead component."""
    point = next(p for p in POINTS if p["id"] == "gist-llama7b-full-z3-gc-mb2")
    b = bench.build(point, DATA)
    est = estimate(b.spec, b.hw, b.tier, b.workload, b.zero)
    total = est.gpu_bytes
    assert b.hw.world_size == 8
    assert bench.compared_estimate(est, "nvidia-smi", b.hw) == total
    assert bench.compared_estimate(est, "unspecified", b.hw) == total
    assert bench.compared_estimate(est, "max_memory_reserved", b.hw) == total - CONTEXT_BYTES["cuda"] - NCCL_BYTES
    assert bench.compared_estimate(est, "max_memory_allocated", b.hw) == total - est.gpu[Component.OVERHEAD]
    one = next(p for p in POINTS if p["id"] == "swift-qwen7b-lora-2048")
    b1 = bench.build(one, DATA)
    est1 = estimate(b1.spec, b1.hw, b1.tier, b1.workload, b1.zero)
    assert bench.compared_estimate(est1, "max_memory_reserved", b1.hw) == est1.gpu_bytes - CONTEXT_BYTES["cuda"]


def test_the_kinds_and_the_rule_are_one_definition():
    """Both scripts take the kind names and the comparison from dsplan.learn.compare, as report and
    calibrate do; neither spells a kind itself."""
    from dsplan.learn import compare

    assert bench.KINDS is compare.PUBLIC_KINDS
    for script in ("bench_public_figures.py", "fit_public_figures.py"):
        text = (REPO / "scripts" / script).read_text()
        assert not re.search(r'"(max_memory_reserved|max_memory_allocated|oom_lower_bound|unspecified)"', text), script


def test_sums_over_gpus_are_divided_and_units_read():
    assert bench.measured_bytes({"value": 162.0, "unit": "GiB", "per_gpu_of_sum": 2}) == 81 * GiB
    assert bench.measured_bytes({"value": 72782, "unit": "MiB"}) == 72782 * 2 ** 20
    assert bench.measured_bytes({"value": 13, "unit": "GB"}) == 13e9


def test_no_deepspeed_runs_are_zero2_on_one_gpu():
    point = next(p for p in POINTS if p["run"].get("tier") == "none")
    b = bench.build(point, DATA)
    assert (b.tier.name, b.hw.world_size, b.tier_label) == ("zero2", 1, "none>zero2")


def _row(rid, group, kind, error=None, agrees=None, fits_plan=False):
    return {"id": rid, "group": group, "framework": "llamafactory" if group == "LF" else "x", "kind": kind,
            "error": error, "agrees": agrees, "fits_plan": fits_plan}


def test_summary_by_hand():
    rows = [_row("a", "LF", "nvidia-smi", 0.10), _row("b", "other", "max_memory_reserved", -0.30),
            _row("c", "other", "unspecified", 0.20), _row("d", "LF", "oom_lower_bound", agrees=True),
            _row("e", "other", "oom_lower_bound", agrees=False, fits_plan=True)]
    s = bench.summarize(rows)
    assert s["rows"] == 5
    assert s["all"]["points"] == 3
    assert s["all"]["median_abs_error"] == pytest.approx(0.20)  # |0.1|, |-0.3|, |0.2| -> 0.2
    assert s["all"]["median_error"] == pytest.approx(0.10)
    assert (s["all"]["worst_abs_error"], s["all"]["worst_id"]) == (pytest.approx(0.30), "b")
    assert s["by_group"]["LF"]["points"] == 1 and s["by_group"]["LF"]["worst_id"] == "a"
    assert s["by_group"]["other"]["median_abs_error"] == pytest.approx(0.25)
    assert s["by_kind"]["max_memory_allocated"]["points"] == 0
    assert s["oom"] == {"points": 2, "agrees": 1, "plan_refuses": 1, "missed": ["e"]}


def test_summary_of_the_real_table_is_computed_from_its_rows(table):
    rows, s = table
    errs = [r["error"] for r in rows if r["error"] is not None]
    assert s["all"]["points"] == len(errs) == sum(r["kind"] != "oom_lower_bound" for r in rows)
    assert s["all"]["median_abs_error"] == pytest.approx(statistics.median(abs(e) for e in errs))
    assert s["all"]["worst_abs_error"] == pytest.approx(max(abs(e) for e in errs))
    lf = [abs(r["error"]) for r in rows if r["error"] is not None and r["framework"] == bench.LF]
    assert s["by_group"]["LF"]["median_abs_error"] == pytest.approx(statistics.median(lf))
    assert s["oom"]["points"] == sum(r["kind"] == "oom_lower_bound" for r in rows)


def test_main_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "median |error|" in printed and POINTS[0]["id"][:40] in printed
    written = json.loads(out.read_text(encoding="utf-8"))
    assert len(written["rows"]) == len(POINTS)
    assert written["summary"]["all"]["points"] == sum(p["measured"]["kind"] != "oom_lower_bound" for p in POINTS)


def test_bad_points_are_refused():
    good = next(p for p in POINTS if p["id"] == "lf5977-llama3-8b-full-z3off-8x3090")
    with pytest.raises(ValueError):
        bench.build({**good, "run": {**good["run"], "model": "no-such-model"}}, DATA)
    with pytest.raises(ValueError):
        bench.build({**good, "run": {**good["run"], "tier": "zero5"}}, DATA)
    with pytest.raises(ValueError):
        bench.build({**good, "run": {**good["run"], "typo_key": 1}}, DATA)
