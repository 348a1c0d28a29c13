#!/usr/bin/env python3
"""The facts behind ``tests/test_preflight_real.py`` and the README's ``--preflight`` figures.

* ``measure``: the cap.  Runs llamafactory-cli uncapped on the test's data (tiny demo
  model, many short samples, one long one at a fixed late step, no shuffling, fp32,
  zero2, one process) and prints the training rank's peak VmData (what RLIMIT_DATA
  limits; sampled every 50 ms, the kernel keeps no mark of it) for: the short batches
  at micro-batch 4, the batch holding the long sample at micro-batch 4, and at
  micro-batch 2 (the fall back).  The test's cap sits between the last two.
* ``times``: the two times to the OOM.  Runs ``dsplan run`` under the test's cap,
  without and with ``--preflight``, and prints for each the wall seconds from the start
  of ``dsplan run`` to its OOM verdict line, and how the run ended.

Usage (from the repo root, with the venv that has llamafactory/deepspeed)::

    .venv/bin/python scripts/bench_preflight.py measure
    .venv/bin/python scripts/bench_preflight.py times

Everything goes under ``--root`` (default /tmp/dsplan-bench-preflight).  On the shared
2-core machine these runs were measured on, every figure is inflated by the other
processes on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from tests import test_preflight_real as case  # after the sys.path lines

GIB = 1024**3


def _rank_peak(row: dict) -> float:
    """The training rank's (LF's launcher.py under torchrun) sampled VmData peak, GiB."""
    ranks = [v["VmData_gib"] for k, v in row["per_process"].items() if "launcher.py" in k]
    return max(ranks) if ranks else float("nan")


def measure(root: Path) -> int:
    """Uncapped runs up to (and through) the long sample's step; the rank's VmData peak of each."""
    from probe_tiny_training import run_one

    assets = case.make_assets(root / "assets")
    _, data_dir, dataset = assets
    base = {"dataset": dataset, "dataset_dir": str(data_dir), "cutoff_len": case.CUTOFF, "disable_shuffling": True,
            "template": "qwen"}
    long_step = case.LONG_ROW // case.MICRO_BATCH + 1
    runs = [("short batches, micro-batch 4", case.MICRO_BATCH, 1, long_step - 1),
            ("long batch, micro-batch 4", case.MICRO_BATCH, 1, long_step),
            ("long batch, micro-batch 2 x GA 2", case.MICRO_BATCH // 2, 2, long_step)]
    results = []
    for what, mb, ga, steps in runs:
        row = run_one(root, assets, "zero2", 1, name=f"measure-mb{mb}-steps{steps}", every=0.05,
                      lf_extra={**base, "per_device_train_batch_size": mb, "gradient_accumulation_steps": ga,
                                "max_steps": steps})
        results.append((what, _rank_peak(row), row["rc"], row["logged_steps"], row["wall_s"]))
        print(f"{what:<34} rank VmData peak {results[-1][1]:.3f} GiB  (rc {row['rc']}, {row['logged_steps']} "
              f"steps, {row['wall_s']} s)", flush=True)
    big, small = results[1][1], results[2][1]
    print(f"\ngap {big - small:.3f} GiB; a cap halfway: {(big + small) / 2:.3f} GiB "
          f"= {int((big + small) / 2 * GIB)} bytes")
    return 0 if all(r[2] == 0 for r in results) else 1


def times(root: Path) -> int:
    """Both runs under the test's cap: seconds from the start of ``dsplan run`` to its OOM verdict."""
    import shutil

    lf_yaml, wrapper = case.prepare(root)
    print(f"cap: RLIMIT_DATA {case.CAP_BYTES / GIB:.2f} GiB per process; long sample at row {case.LONG_ROW} "
          f"(step {case.LONG_STEP} of {case.ROWS // case.MICRO_BATCH} at micro-batch {case.MICRO_BATCH})", flush=True)
    results = {}
    for name, extra in (("without --preflight", ["--no-fallback"]), ("with --preflight", ["--preflight"])):
        run_dir = root / name.replace(" ", "_").replace("-", "")
        shutil.rmtree(run_dir, ignore_errors=True)
        rc, to_oom, total, _ = case.run_timed(root, lf_yaml, wrapper, run_dir, *extra)
        ledger = case.json_ledger(run_dir)
        where = [f"{'preflight ' if a.get('preflight') else ''}attempt {a['attempt']} mb {a['micro_batch']}: "
                 f"{a['verdict']} after {len(case.logged_steps(a['output_dir']))} logged step(s)" for a in ledger]
        results[name] = to_oom
        shown = f"{to_oom:.1f} s" if to_oom is not None else "none"
        print(f"{name:<20} time to the OOM verdict {shown}; exit {rc} after {total:.1f} s; " + "; ".join(where),
              flush=True)
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f} on {os.cpu_count()} cores (other work on the machine inflates "
          "every figure)")
    return 0 if all(v is not None for v in results.values()) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["measure", "times"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/dsplan-bench-preflight"))
    a = ap.parse_args(argv)
    a.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return measure(a.root) if a.what == "measure" else times(a.root)


if __name__ == "__main__":
    sys.exit(main())
