#!/usr/bin/env python3
"""dsplan's GPU estimate against peaks measured and published by others.

Reads ``tests/data/public_peaks.yaml`` (each point: its source URL, a verbatim quote,
the run's configuration and the measured figure), rebuilds every run in dsplan's own
terms -- a :class:`~dsplan.inputs.model.ModelSpec` from the catalog or from the
point's config.json dict, a :class:`~dsplan.inputs.hardware.HardwareProfile`, a
:class:`~dsplan.estimate.workload.Workload` and the tier's ``zero_optimization`` --
and calls :func:`dsplan.estimate.estimate.estimate` for exactly the tier the run used.
No torch, no planner choices: the micro-batch, tier and DeepSpeed buckets are the
source's, not the ones dsplan would pick.

    python scripts/bench_public_figures.py [--data FILE] [--json OUT]

Comparison rule, by what the source measured (``measured.kind``); the rule and the kind names
are :mod:`dsplan.learn.compare`'s, the ones ``dsplan report`` and ``calibrate`` use:

* ``nvidia-smi``: the process's total on the card, CUDA context included.  Compared
  with the whole estimate (``Estimate.gpu_bytes``).
* ``unspecified``: the source does not say how it measured; compared like nvidia-smi.
* ``max_memory_reserved``: PyTorch's caching allocator only.  It leaves out the CUDA
  context and libraries and NCCL's buffers, which are not allocated through it, so it
  is compared with the estimate less ``CONTEXT_BYTES[backend]`` and, on more than one
  GPU, less ``NCCL_BYTES`` (both from :mod:`dsplan.estimate.estimate`, where they make
  up the fixed part of the ``overhead`` component).
* ``max_memory_allocated``: live tensors only.  Besides the context and NCCL it also
  leaves out the allocator's slack, so it is compared with the estimate less the whole
  ``overhead`` component.
* ``oom_lower_bound``: the run died of OOM, so its demand exceeded the card
  (``run.gpu_mem_gib``).  There is no error figure; the row says whether dsplan's
  estimate also exceeds the card (``agrees``), by how much (``margin``), and whether
  ``plan`` would call the tier fitting once its headroom is taken off (``fits_plan``).

Error is (estimate - measured) / measured on the compared quantities; positive means
dsplan over-estimates.  A figure the source sums over N GPUs (``per_gpu_of_sum: N``) is
divided by N.  Runs without DeepSpeed (``tier: none``) are estimated as ZeRO-2 on their
one GPU, the nearest thing dsplan models; the table marks them ``none>zero2``.

The summary gives the number of points with an error figure, the median and worst
|error|, and the same split by framework (LLaMA-Factory against the others) and by kind
of measurement; then how many OOM reports the estimate agrees with.  These points are a
regression table: no constant in dsplan is fitted to them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # dsplan depends on pyyaml

from dsplan.estimate.estimate import Estimate, Runtime, estimate
from dsplan.estimate.workload import Workload
from dsplan.inputs import catalog
from dsplan.inputs.hardware import HardwareProfile, find_gpu_model
from dsplan.inputs.model import ModelSpec, spec_from_config
from dsplan.learn.compare import (
    ALLOCATED,
    OOM_CARD,
    PUBLIC_KINDS,
    RESERVED,
    of_estimate,
)
from dsplan.plan.planner import DEFAULT_HEADROOM
from dsplan.plan.tiers import TIERS, Tier
from dsplan.schema.ds import Offload, ZeroOptimization
from dsplan.units import GiB

DATA = REPO / "tests" / "data" / "public_peaks.yaml"

KINDS = PUBLIC_KINDS
UNITS = {"GiB": GiB, "GB": 10 ** 9, "MiB": 2 ** 20}
#: Framework label of LLaMA-Factory points; every other label is "other" in the summary.
LF = "llamafactory"
_BY_TIER = {t.name: t for t in TIERS}
#: Keys of ``run`` that go straight into Workload.
_WORKLOAD_KEYS = ("method", "stage", "cutoff_len", "micro_batch", "gradient_checkpointing", "attention",
                  "lora_rank", "quantization_bit", "quantization_method", "liger", "optim")
RUN_KEYS = frozenset(_WORKLOAD_KEYS + ("model", "lora_targets", "extra_modules", "tier", "zero", "nodes",
                                      "gpus_per_node", "gpu_mem_gib", "gpu_name", "backend"))


@dataclass(frozen=True)
class Built:
    """One point in dsplan's terms."""

    spec: ModelSpec
    hw: HardwareProfile
    tier: Tier
    workload: Workload
    zero: ZeroOptimization
    tier_label: str


def load(path: Path = DATA) -> dict:
    """The data file: ``zero_presets``, ``models`` and ``points``."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise TypeError(f"{path}: expected a mapping with a 'points' list")
    return data


def measured_bytes(m: dict) -> float:
    """The measured figure per GPU, in bytes."""
    return float(m["value"]) * UNITS[m["unit"]] / int(m.get("per_gpu_of_sum", 1))


def _spec(name: str, models: dict) -> ModelSpec:
    if name in models:
        return spec_from_config(models[name], name=name, source="tests/data/public_peaks.yaml")
    hit = catalog.lookup(name)
    if hit is None:
        raise ValueError(f"model {name!r} is neither under 'models:' nor in dsplan's catalog")
    canon, entry = hit
    return spec_from_config(entry["config"], name=canon, template=entry["template"],
                            source=f"catalog: {entry['hf_id']}", hf_id=entry["hf_id"])


def _tier(value: Any) -> tuple[Tier, str]:
    """(tier, label): one of dsplan's tiers, ``none`` (no DeepSpeed: ZeRO-2 on one GPU), or a
    custom stage/offload combination given as a dict."""
    if isinstance(value, dict):
        stage = int(value["stage"])
        opt, par = bool(value.get("offload_optimizer")), bool(value.get("offload_param"))
        if stage not in (2, 3) or (par and stage != 3):
            raise ValueError(f"custom tier {value!r}: stage 2 or 3, offload_param only at stage 3")
        name = f"zero{stage}" + ("_optoff" if opt and not par else "_offload" if opt else "")
        return Tier(name, stage, opt, par, 0, "custom tier from the data file"), f"{name}*"
    if value == "none":
        return _BY_TIER["zero2"], "none>zero2"
    if value not in _BY_TIER:
        raise ValueError(f"unknown tier {value!r}")
    return _BY_TIER[value], value


def _zero(tier: Tier, value: Any, presets: dict) -> ZeroOptimization:
    """The tier's zero_optimization: the stage and offloads from the tier, sizes from the preset or dict."""
    overrides = presets[value] if isinstance(value, str) else (value or {})
    unknown = set(overrides) - {"allgather_bucket_size", "reduce_bucket_size", "overlap_comm", "sub_group_size",
                                "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                                "stage3_max_reuse_distance", "stage3_param_persistence_threshold"}
    if unknown:
        raise ValueError(f"zero keys the bench does not pass on: {sorted(unknown)}")
    kw: dict[str, Any] = {"stage": tier.stage}
    if tier.offload_optimizer:
        kw["offload_optimizer"] = Offload()
    if tier.offload_param:
        kw["offload_param"] = Offload()
    for key, val in overrides.items():
        kw[key] = val if isinstance(val, (str, bool)) else int(val)
    return ZeroOptimization(**kw)


def build(point: dict, data: dict) -> Built:
    """dsplan's inputs for one point; raises ValueError (or dsplan's UserError) when it cannot."""
    run = point["run"]
    unknown = set(run) - RUN_KEYS
    if unknown:
        raise ValueError(f"{point['id']}: unknown run keys {sorted(unknown)}")
    spec = _spec(run["model"], data.get("models") or {})
    tier, label = _tier(run.get("tier", "zero2"))
    no_ds = run.get("tier") == "none"
    nodes = 1 if no_ds else int(run.get("nodes", 1))
    per_node = 1 if no_ds else int(run.get("gpus_per_node", 1))
    gpu = run.get("gpu_name")
    hw = HardwareProfile(nodes=nodes, gpus_per_node=per_node, gpu_mem=int(float(run["gpu_mem_gib"]) * GiB),
                         backend=run.get("backend", "cuda"),
                         gpu_name=find_gpu_model(str(gpu)).name if gpu and find_gpu_model(str(gpu)) else None)
    kw = {k: run[k] for k in _WORKLOAD_KEYS if k in run}
    if run.get("method") == "qlora" and "quantization_bit" not in kw:
        kw["quantization_bit"] = 4
    if run.get("lora_targets"):
        kw["lora_targets"] = tuple(run["lora_targets"])
    if run.get("extra_modules"):
        kw["extra_modules"] = tuple(run["extra_modules"])
    workload = Workload(**kw)
    zero = _zero(tier, run.get("zero", "ds_defaults"), data.get("zero_presets") or {"ds_defaults": {}})
    return Built(spec, hw, tier, workload, zero, label)


def compared_estimate(est: Estimate, kind: str, hw: HardwareProfile) -> float:
    """The part of the estimate (made with the backend's defaults) that the measurement ``kind``
    covers: :meth:`dsplan.learn.compare.GpuFigures.comparable`."""
    return of_estimate(est, hw.world_size, Runtime.default(hw.backend)).comparable(kind)


def evaluate(point: dict, data: dict) -> dict:
    """One row of the table."""
    b = build(point, data)
    est = estimate(b.spec, b.hw, b.tier, b.workload, b.zero)
    m = point["measured"]
    kind = m["kind"]
    measured = measured_bytes(m)
    compared = compared_estimate(est, kind, b.hw)
    run = point["run"]
    row = {
        "id": point["id"],
        "source": point["source"],
        "framework": point["framework"],
        "group": "LF" if point["framework"] == LF else "other",
        "model": b.spec.name,
        "method": b.workload.method + (f"/{b.workload.stage}" if b.workload.stage != "sft" else ""),
        "tier": b.tier_label,
        "gpus": b.hw.world_size if run.get("tier") != "none" else 1,
        "tokens": b.workload.cutoff_len * b.workload.micro_batch,
        "kind": kind,
        "measured_gib": measured / GiB,
        "estimate_gib": est.gpu_bytes / GiB,
        "compared_gib": compared / GiB,
        "breakdown_gib": {str(k): v / GiB for k, v in sorted(est.gpu.items(), key=lambda kv: -kv[1])},
        "error": None,
        "fits_card": est.gpu_bytes <= b.hw.gpu_mem,
        "fits_plan": est.gpu_bytes <= b.hw.gpu_mem * (1 - DEFAULT_HEADROOM),
        "agrees": None,
        "margin": None,
    }
    if kind == OOM_CARD:
        row["agrees"] = est.gpu_bytes > b.hw.gpu_mem
        row["margin"] = (est.gpu_bytes - b.hw.gpu_mem) / b.hw.gpu_mem
    else:
        row["error"] = (compared - measured) / measured
    return row


def summarize(rows: list[dict]) -> dict:
    """Counts, median and worst |error| overall, per group (LF/other) and per kind; OOM agreement."""
    def stats(sel: list[dict]) -> dict:
        errs = [r for r in sel if r["error"] is not None]
        if not errs:
            return {"points": 0, "median_abs_error": None, "worst_abs_error": None, "worst_id": None,
                    "median_error": None}
        worst = max(errs, key=lambda r: abs(r["error"]))
        return {"points": len(errs),
                "median_abs_error": statistics.median(abs(r["error"]) for r in errs),
                "worst_abs_error": abs(worst["error"]), "worst_id": worst["id"],
                "median_error": statistics.median(r["error"] for r in errs)}

    ooms = [r for r in rows if r["kind"] == OOM_CARD]
    return {
        "rows": len(rows),
        "all": stats(rows),
        "by_group": {g: stats([r for r in rows if r["group"] == g]) for g in ("LF", "other")},
        "by_kind": {k: stats([r for r in rows if r["kind"] == k]) for k in KINDS if k != OOM_CARD},
        "by_framework": {f: stats([r for r in rows if r["framework"] == f])
                         for f in dict.fromkeys(r["framework"] for r in rows)},
        "oom": {"points": len(ooms), "agrees": sum(bool(r["agrees"]) for r in ooms),
                "plan_refuses": sum(not r["fits_plan"] for r in ooms),
                "missed": [r["id"] for r in ooms if not r["agrees"]]},
    }


def run_all(path: Path = DATA) -> tuple[list[dict], dict]:
    data = load(path)
    rows = [evaluate(p, data) for p in data["points"]]
    return rows, summarize(rows)


# ---------------------------------------------------------------- printing
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def format_table(rows: list[dict]) -> str:
    head = (f"{'id':<48} {'model':<28} {'method':<9} {'tier':<14} {'GPUs':>4} {'kind':<13} "
            f"{'measured':>8} {'estimate':>8} {'compared':>8} {'error':>6}  top component")
    lines = [head, "-" * len(head)]
    for r in rows:
        kind = {RESERVED: "reserved", ALLOCATED: "allocated", OOM_CARD: "OOM > card"}.get(r["kind"], r["kind"])
        if r["kind"] == OOM_CARD:
            err = "fits!" if not r["agrees"] else "no-fit"
        else:
            err = _pct(r["error"])
        top = next(iter(r["breakdown_gib"].items()))
        lines.append(f"{r['id'][:48]:<48} {r['model'][:28]:<28} {r['method']:<9} {r['tier']:<14} {r['gpus']:>4} "
                     f"{kind:<13} {r['measured_gib']:>8.1f} {r['estimate_gib']:>8.1f} {r['compared_gib']:>8.1f} "
                     f"{err:>6}  {top[0]} {top[1]:.1f}")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    def line(label: str, st: dict) -> str:
        if not st["points"]:
            return f"  {label:<24} no points"
        return (f"  {label:<24} {st['points']:>3} points   median |error| {100 * st['median_abs_error']:5.1f}%   "
                f"median error {100 * st['median_error']:+6.1f}%   worst {100 * st['worst_abs_error']:6.1f}% "
                f"({st['worst_id']})")
    out = [f"{s['rows']} rows; error = (estimate - measured) / measured on the compared quantity", line("all", s["all"])]
    out += [line(f"group {g}", st) for g, st in s["by_group"].items()]
    out += [line(f"kind {k}", st) for k, st in s["by_kind"].items()]
    out += [line(f"framework {f}", st) for f, st in s["by_framework"].items()]
    o = s["oom"]
    out.append(f"  OOM reports: the estimate exceeds the card in {o['agrees']} of {o['points']} "
               f"(plan, with its headroom, refuses {o['plan_refuses']})"
               + (f"; says it fits: {', '.join(o['missed'])}" if o["missed"] else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="points file (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the rows and the summary as JSON")
    args = ap.parse_args(argv)
    rows, summary = run_all(args.data)
    print(format_table(rows))
    print()
    print(format_summary(summary))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    return 0 if all(math.isfinite(r["estimate_gib"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
