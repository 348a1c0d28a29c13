#!/usr/bin/env python3
"""How long does dsplan take to measure a dataset's token lengths, cold and with a warm cache?

Times :func:`dsplan.inputs.data.measure` on LF's ``alpaca_en_demo`` (and the other demo
sets in tests/data/lf_demo) with a byte-level BPE tokenizer trained here on the demo data
(the shape of Qwen2's), each run in a fresh Python process as ``dsplan plan`` would be:

* cold: an empty length cache, so the data is read, rendered and tokenized;
* warm: the same call again, answered from the cache.

Each figure is the best of ``--repeat`` runs: the time inside ``measure`` and the whole
process (interpreter start and imports included).  ``--scale N`` adds a copy of
alpaca_en_demo repeated N times (N x 999 samples) to see the throughput; ``--lf-python``
also times LF's own pipeline (the ``lf`` engine) under that interpreter.

    /tmp/lv/bin/python scripts/bench_dataset.py [--repeat 3] [--scale 50] [--lf-python .venv/bin/python]

Needs ``tokenizers`` (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_dataset import DEMO, build_tokenizer  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from dsplan.inputs.data import DataSpec, measure
spec = DataSpec(**json.loads(sys.argv[1]))
t1 = time.perf_counter()
p = measure(spec, python=sys.argv[3] or None, engine=sys.argv[4], cache_dir=sys.argv[2])
t2 = time.perf_counter()
heavy = [m for m in ("torch", "transformers", "datasets", "llamafactory") if m in sys.modules]
print(json.dumps({"measure": t2 - t1, "import": t1 - t0, "method": p.method, "cached": p.cached,
                  "count": len(p.lengths), "max": p.stats().max, "heavy": heavy}))
"""


def run_once(spec: dict, cache: Path, python: str, engine: str, lf_python: str) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([python, "-c", CHILD, json.dumps(spec), str(cache), lf_python, engine],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - t0
    return result


def bench(label: str, spec: dict, work: Path, repeat: int, engine: str = "auto", lf_python: str = "") -> None:
    python = lf_python or sys.executable
    colds, warms = [], []
    for i in range(repeat):
        cache = work / f"cache-{label}-{i}"
        shutil.rmtree(cache, ignore_errors=True)
        colds.append(run_once(spec, cache, python, engine, lf_python))
        warms.append(run_once(spec, cache, python, engine, lf_python))
    for name, runs in (("cold", colds), ("warm", warms)):
        best = min(runs, key=lambda r: r["measure"])
        print(f"{label:34} {name:4} {best['method']:9} cached={str(best['cached']):5} n={best['count']:6} "
              f"max={best['max']:6} | measure {best['measure']:7.3f} s | process {best['process']:7.3f} s "
              f"(imports {best['import']:.3f} s) | heavy modules: {best['heavy'] or 'none'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=int, default=0, help="also time alpaca_en_demo repeated N times")
    ap.add_argument("--lf-python", default="", help="also time LF's own pipeline under this interpreter")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsplan-bench-dataset-"))
    try:
        t0 = time.perf_counter()
        tok = build_tokenizer(work / "tok")
        print(f"tokenizer trained on the demo data in {time.perf_counter() - t0:.1f} s; python {sys.executable}; "
              f"{os.cpu_count()} CPUs\n")
        base = {"dataset_dir": str(DEMO), "template": "qwen", "cutoff_len": 2048, "model_name_or_path": str(tok)}
        for name in ("alpaca_en_demo", "identity", "glaive_toolcall_en_demo"):
            bench(name, {**base, "dataset": name}, work, args.repeat)
        bench("alpaca_en_demo (no tokenizer)", {**base, "dataset": "alpaca_en_demo", "model_name_or_path": None},
              work, args.repeat)
        if args.scale:
            data = work / "data"
            data.mkdir()
            rows = json.loads((DEMO / "alpaca_en_demo.json").read_text(encoding="utf-8")) * args.scale
            (data / "big.json").write_text(json.dumps(rows), encoding="utf-8")
            (data / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big.json"}}))
            bench(f"alpaca_en_demo x{args.scale}", {**base, "dataset": "big", "dataset_dir": str(data)}, work,
                  max(1, args.repeat // 2))
        if args.lf_python:
            bench("alpaca_en_demo (LF's pipeline)", {**base, "dataset": "alpaca_en_demo"}, work, 1, "lf",
                  args.lf_python)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
