#!/usr/bin/env python3
"""How fast dsplan answers on a login node without torch, beside `import deepspeed`.

Builds dsplan's wheel, installs it into a fresh virtual environment that has only
dsplan's light dependencies (no torch, deepspeed or llamafactory; the script checks),
then times, as whole commands:

- ``dsplan render --gpus 8x64G --backend rocm --model <folder with config.json> -o out/``
- ``dsplan plan`` for the same model and hardware
- ``python -c "import deepspeed"`` in the training environment (this interpreter, or --train-python)

Usage: python scripts/bench_cli_speed.py [--runs 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
          "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False}


def timed(argv: list[str], runs: int, env=None, prepare=None) -> list[float]:
    times = []
    for i in range(runs):
        if prepare:
            prepare(i)
        t0 = time.perf_counter()
        r = subprocess.run(argv(i) if callable(argv) else argv, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if r.returncode not in (0, 4):
            raise SystemExit(f"command failed ({r.returncode}): {r.stderr[-2000:]}")
    return times


def fmt(ts: list[float]) -> str:
    return f"median {statistics.median(ts):.3f} s  (min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--train-python", default=sys.executable, help="interpreter that has deepspeed")
    ap.add_argument("--keep", metavar="DIR", help="build the light venv here and keep it")
    args = ap.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="dsplan-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    venv = work / "venv-no-torch"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        wheels = work / "wheel"
        shutil.rmtree(wheels, ignore_errors=True)
        subprocess.run([str(py), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)], check=True)
        wheel = next(wheels.glob("dsplan-*.whl"))
        subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True)
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torch', 'deepspeed', "
                            "'llamafactory') if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    if probe.stdout.strip() != "[]":
        raise SystemExit(f"the light venv has {probe.stdout.strip()}: not a torch-free environment")
    dsplan = str(venv / "bin" / "dsplan")
    model = work / "DeepSeek-R1-Distill-Qwen-32B"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(CONFIG))
    outs = work / "outs"
    shutil.rmtree(outs, ignore_errors=True)
    env = dict(os.environ)

    hw = ["--gpus", "8x64G", "--backend", "rocm", "--model", str(model)]
    timed([dsplan, "--version"], 1, env)  # warm the byte-code cache once, as any second run would be
    render = timed(lambda i: [dsplan, "render", *hw, "-o", str(outs / f"out{i}")], args.runs, env)
    plan = timed([dsplan, "plan", *hw, "--host-ram", "512G"], args.runs, env)
    ds = timed([args.train_python, "-c", "import deepspeed"], max(3, args.runs // 3))

    print(f"environment without torch: {venv}")
    print(f"dsplan render (8x64G rocm, 32B config.json, 4 tiers): {fmt(render)}")
    print(f"dsplan plan   (same):                                {fmt(plan)}")
    print(f"python -c 'import deepspeed' ({args.train_python}): {fmt(ds)}")
    print(f"render is {statistics.median(ds) / statistics.median(render):.0f}x faster than importing deepspeed")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
