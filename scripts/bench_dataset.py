#!/usr/bin/env python3
"""How long does dsplan take to measure a dataset's token lengths, cold and with a warm cache,
and what does ``dsplan plan`` make of LF's demo datasets?

Times :func:`dsplan.inputs.data.measure` on LF's ``alpaca_en_demo`` (and the other demo
sets in tests/data/lf_demo) with a byte-level BPE tokenizer trained here on the demo data
(the shape of Qwen2's), each run in a fresh Python process as ``dsplan plan`` would be:

* cold: an empty length cache, so the data is read, rendered and tokenized;
* warm: the same call again, answered from the cache.

Each figure is the best of ``--repeat`` runs: the time inside ``measure`` and the whole
process (interpreter start and imports included).  ``--scale N`` adds a copy of
alpaca_en_demo repeated N times (N x 999 samples) to see the throughput; ``--lf-python``
also times LF's own pipeline (the ``lf`` engine) under that interpreter.

Then ``dsplan plan`` itself, each a fresh process under this interpreter (the login-node
path: ``DSPLAN_TRAIN_PYTHON`` unset, so the tokenizer estimate; the model folder is a
Qwen2.5-0.5B config.json beside the tokenizer):

* on alpaca_en_demo, identity and glaive_toolcall_en_demo at each ``--cutoffs`` value: the
  plan's max/p99/median and truncation count, the same from LF's own pipeline (with
  ``--lf-python``: LF 0.9.5 in dsplan's length worker under that interpreter) and the
  difference on the max (the issue asks for 5 %), and the plan's tokens per micro-batch
  (the worst batch) against cutoff_len x micro-batch;
* the whole ``plan`` process on alpaca_en_demo with an empty length cache
  (``$XDG_CACHE_HOME/dsplan/lengths``) and again with it warm, against ``plan`` without a
  dataset, and which heavy modules (torch, transformers, datasets, llamafactory, deepspeed)
  the process imported.

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

from tests.conftest import QWEN_SMALL  # noqa: E402
from tests.test_dataset import DEMO, build_tokenizer  # noqa: E402

DEMO_SETS = ("alpaca_en_demo", "identity", "glaive_toolcall_en_demo")
#: Where the `plan` children keep their bytecode (set in main; one folder for every run).
PYCACHE = Path(tempfile.gettempdir()) / "dsplan-bench-pycache"
#: `dsplan plan` in a fresh process; at exit it reports the heavy modules it imported.
PLAN_CHILD = """
import atexit, json, sys
def report():
    heavy = [m for m in ("torch", "transformers", "datasets", "llamafactory", "deepspeed") if m in sys.modules]
    sys.stderr.write("BENCH-HEAVY " + json.dumps(heavy) + "\\n")
atexit.register(report)
from dsplan.cli import cli
cli.main(sys.argv[1:], prog_name="dsplan")
"""

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


# ---------------------------------------------------------------- dsplan plan with a dataset
def run_plan(args: list[str], xdg: Path) -> tuple[str, float, list[str]]:
    """(stdout, process seconds, heavy modules) of one `dsplan plan` in a fresh process."""
    # bytecode as an installed package has it, kept outside the repository
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(xdg), PYTHONPYCACHEPREFIX=str(PYCACHE))
    env.pop("DSPLAN_TRAIN_PYTHON", None)  # the login-node path: the tokenizer estimate
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PLAN_CHILD, "plan", *args], capture_output=True, text=True,
                         cwd=REPO, env=env)
    seconds = time.perf_counter() - t0
    if out.returncode not in (0, 4):
        raise SystemExit(f"dsplan plan failed ({out.returncode}): {out.stderr[-2000:]}")
    heavy = next(json.loads(line.split(" ", 1)[1]) for line in out.stderr.splitlines()
                 if line.startswith("BENCH-HEAVY "))
    return out.stdout, seconds, heavy


def plan_args(model, dataset: str | None, cutoff, micro_batch: int, gpus: str,
              template: str = "qwen") -> list[str]:
    args = ["--gpus", gpus, "--model", str(model), "--template", template, "--cutoff-len", str(cutoff),
            "--micro-batch", str(micro_batch)]
    return args + (["--dataset", dataset, "--dataset-dir", str(DEMO)] if dataset else [])


def lf_lengths(tok: Path, cases: list[tuple[str, int, str]], lf_python: str) -> dict:
    """LF's own pipeline's stats per (dataset, cutoff, template), one worker for all of them (empty without LF)."""
    if not lf_python:
        return {}
    from dsplan.inputs.data import DataSpec, measure_many

    specs = [DataSpec(dataset=n, dataset_dir=str(DEMO), template=t, cutoff_len=c, model_name_or_path=str(tok))
             for n, c, t in cases]
    t0 = time.perf_counter()
    profiles = measure_many(specs, python=lf_python, engine="lf", use_cache=False)
    print(f"LF's pipeline (llamafactory in dsplan's worker under {lf_python}): {time.perf_counter() - t0:.1f} s "
          f"for {len(specs)} dataset x cutoff x template cases\n")
    for p in profiles:
        if p.method != "lf":
            raise SystemExit(f"LF's pipeline did not run: {p.notes}")
    return {k: p.stats() for k, p in zip(cases, profiles)}


def demo_plans(model: Path, tok: Path, work: Path, args) -> None:
    """`dsplan plan` on LF's demo sets: lengths against LF's own, tokens per micro-batch against cutoff."""
    cases = [(n, c, t) for t in args.templates for c in args.cutoffs for n in DEMO_SETS]
    exact = lf_lengths(tok, cases, args.lf_python)
    print(f"dsplan plan {' '.join(plan_args('MODEL', 'NAME', 'CUTOFF', args.micro_batch, args.gpus, 'TEMPLATE'))} "
          "--json")
    print(f"{'dataset':24} {'template':8} {'cutoff':>6} | {'plan: max':>9} {'p99':>6} {'median':>6} {'cut':>3} | "
          f"{'LF: max':>7} {'p99':>6} {'median':>6} {'cut':>3} | {'max diff':>8} | tokens/micro-batch: worst batch "
          f"vs cutoff_len x mb  (choice)")
    for name, cutoff, template in cases:
        out, _, _ = run_plan(plan_args(model, name, cutoff, args.micro_batch, args.gpus, template) + ["--json"],
                             work / "xdg-demo")
        d = json.loads(out)
        st, planned = d["dataset"]["stats"], d["dataset"]["planned"]
        row = (f"{name:24} {template:8} {cutoff:6} | {st['max']:9,} {st['p99']:6,} {st['median']:6,} "
               f"{st['truncated']:3} | ")
        lf = exact.get((name, cutoff, template))
        if lf is not None:
            row += (f"{lf.max:7,} {lf.p99:6,} {lf.median:6,} {lf.truncated:3} | "
                    f"{100 * (st['max'] - lf.max) / lf.max:+7.2f}% | ")
        else:
            row += f"{'(no --lf-python)':>29} | {'':8} | "
        row += (f"{planned['tokens']:>7,} ({planned['micro_batch']} x {planned['seq_len']:,}) vs "
                f"{planned['cutoff_tokens']:,}  ({d['choice']}, {d['dataset']['method']})")
        print(row)
    print()


def time_plans(model: Path, work: Path, args) -> None:
    """The whole `dsplan plan` process on alpaca_en_demo: cold cache, warm cache, and no dataset."""
    with_data = plan_args(model, "alpaca_en_demo", 2048, args.micro_batch, args.gpus)
    runs = {"cold": [], "warm": [], "no dataset": []}
    heavy = set()
    run_plan(with_data, work / "xdg-prime")  # compiles the bytecode once, as an install would have it
    for i in range(args.repeat):
        xdg = work / f"xdg-time-{i}"
        shutil.rmtree(xdg, ignore_errors=True)
        for label, a in (("cold", with_data), ("warm", with_data),
                         ("no dataset", plan_args(model, None, 2048, args.micro_batch, args.gpus))):
            _, seconds, h = run_plan(a, xdg)
            runs[label].append(seconds)
            heavy.update(h)
    print(f"dsplan plan {' '.join(with_data)}  (python {sys.executable}, bytecode compiled, best of "
          f"{args.repeat}; cold: an empty $XDG_CACHE_HOME/dsplan/lengths)")
    for label, times in runs.items():
        print(f"  {label:10} {min(times):6.3f} s  (all: {', '.join(f'{t:.3f}' for t in times)})")
    print(f"  heavy modules imported by plan: {sorted(heavy) or 'none'}; load average now "
          f"{os.getloadavg()[0]:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=int, default=0, help="also time alpaca_en_demo repeated N times")
    ap.add_argument("--lf-python", default="", help="also time LF's own pipeline under this interpreter, and "
                    "compare the plan's lengths with it")
    ap.add_argument("--cutoffs", default="16384,4096", help="cutoff_len values of the demo-set plans")
    ap.add_argument("--templates", default="qwen,llama3", help="templates of the demo-set plans")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--gpus", default="8x80G", help="--gpus of the plans")
    ap.add_argument("--only-plan", action="store_true", help="skip the measure() timings")
    args = ap.parse_args()
    args.cutoffs = [int(c) for c in args.cutoffs.split(",")]
    args.templates = args.templates.split(",")
    work = Path(tempfile.mkdtemp(prefix="dsplan-bench-dataset-"))
    try:
        t0 = time.perf_counter()
        tok = build_tokenizer(work / "tok")
        print(f"tokenizer trained on the demo data in {time.perf_counter() - t0:.1f} s; python {sys.executable}; "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}\n")
        if not args.only_plan:
            measure_timings(tok, work, args)
            print()
        model = build_tokenizer(work / "model")  # the same tokenizer (the training is deterministic)
        (model / "config.json").write_text(json.dumps(QWEN_SMALL), encoding="utf-8")
        demo_plans(model, tok, work, args)
        time_plans(model, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def measure_timings(tok: Path, work: Path, args) -> None:
    """measure() alone, cold and warm, on each demo set (and scaled up, and under LF)."""
    base = {"dataset_dir": str(DEMO), "template": "qwen", "cutoff_len": 2048, "model_name_or_path": str(tok)}
    for name in DEMO_SETS:
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

if __name__ == "__main__":
    sys.exit(main())
