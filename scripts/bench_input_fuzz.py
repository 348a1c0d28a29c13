"""Time every generated bad input of tests/test_input_fuzz.py, one case at a time.

Runs each family of the suite (the same strategies and checks, so every case is also
checked against the user-error contract) and prints, per family and in total, how
many cases ran and the slowest and median time of one case, measured around the
dsplan call and its checks (not hypothesis' own generation).  The issue's bound is
2 s per case.  Then it runs the suite's worst inputs as subprocesses, the way a user
would, and prints their wall times (Python start-up included).

    python scripts/bench_input_fuzz.py [--scale 1.0] [--family NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import test_input_fuzz as suite  # noqa: E402

LIMIT_S = 2.0


def bench_families(scale: float, names: list[str] | None) -> list[float]:
    every: list[float] = []
    print(f"{'family':<22} {'cases':>6} {'max s':>8} {'median s':>9}")
    for family in suite.CASES:
        if names and family.name not in names:
            continue
        times: list[float] = []
        slowest: list = [0.0, None]

        def seen(seconds: float, draw) -> None:
            times.append(seconds)
            if seconds > slowest[0]:
                slowest[:] = [seconds, draw]

        scaled = suite.Case(family.name, family.strategy, family.check, max(1, round(family.examples * scale)))
        suite.run_family(scaled, on_example=seen)
        every += times
        print(f"{family.name:<22} {len(times):>6} {max(times):>8.3f} {statistics.median(times):>9.4f}"
              f"   slowest: {ascii(slowest[1])[:60]}")
    print(f"{'all':<22} {len(every):>6} {max(every):>8.3f} {statistics.median(every):>9.4f}")
    return every


def bench_worst() -> float:
    """The subprocess smoke cases, timed; returns the slowest."""
    slowest = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flags = [[*args, *(["-o", str(work / "out")] if args[0] == "render" else [])] for args in suite.WORST]
        for args in flags + suite.worst_file_cases(work):
            start = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "dsplan", *args], capture_output=True, text=True,
                               timeout=120, cwd=REPO)
            took = time.perf_counter() - start
            slowest = max(slowest, took)
            shown = " ".join(a if len(a) < 40 else a[:18] + "..." + a[-18:] for a in args)
            print(f"  {took:6.3f} s  exit {r.returncode}  dsplan {shown}")
    return slowest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every family's case count")
    ap.add_argument("--family", action="append", help="only these families (repeatable)")
    ap.add_argument("--no-subprocess", action="store_true", help="skip the subprocess timings")
    args = ap.parse_args()
    times = bench_families(args.scale, args.family)
    worst = 0.0
    if not args.no_subprocess:
        print("worst inputs as subprocesses:")
        worst = bench_worst()
    ok = max(times) <= LIMIT_S and worst <= LIMIT_S
    print(f"{len(times)} cases, slowest in-process {max(times):.3f} s, slowest subprocess {worst:.3f} s: "
          f"{'within' if ok else 'OVER'} the {LIMIT_S:.0f} s bound")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
