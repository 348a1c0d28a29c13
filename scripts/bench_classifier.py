#!/usr/bin/env python3
"""How fast does the log classifier read hostile and ordinary logs?

Times, on this machine, the workloads whose speed tests/test_verdicts.py and
tests/test_diagnose.py used to assert (those tests now check only the
answers), and prints each figure next to the bound the test once had:

* two 1 MiB lines (plain filler, and one full of rule trigger words);
* 256 KiB of random bytes decoded as text, plus a line of ANSI/control noise;
* a real torchrun log with its deciding lines removed, repeated 200 times;
* ``diagnose_file`` on an 8.5 MiB log: 80 000 ordinary lines, one 3 MiB line, an OOM.

    python scripts/bench_classifier.py [--repeat 3]

Each workload runs ``--repeat`` times on a fresh classifier; the best time counts.
Standard library only, like the classifier itself.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsplan.logs import diagnose as dg
from dsplan.logs.classifier import Classifier

LOGS = REPO / "tests" / "logs"
OOM_LINE = (b"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. "
            b"GPU 0 has a total capacity of 79.25 GiB")


def huge_lines() -> int:
    clf = Classifier()
    clf.feed("x" * (1 << 20))
    clf.feed("error memory alloc killed exit " * 35000)
    return 2


def _garbage() -> list[str]:
    rng = random.Random(1234)
    blob = bytes(rng.getrandbits(8) for _ in range(1 << 18))
    return blob.decode("utf-8", errors="replace").split("\n") + ["\x00\x1b[31m\x1b]0;title\x07\ufffd\ufffd" * 1000]


def _ordinary() -> list[str]:
    text = (LOGS / "host_oom__lf_torchrun_sigkill_exit1.log").read_bytes().decode("utf-8", errors="replace")
    return [ln for ln in text.split("\n") if "exitcode" not in ln and "SIGKILL" not in ln] * 200


def feeder(lines: list[str]) -> Callable[[], int]:
    def run() -> int:
        clf = Classifier()
        for line in lines:
            clf.feed(line)
        return len(lines)
    return run


def _big_log(folder: Path) -> Path:
    log = folder / "big.log"
    filler = b"[INFO|trainer.py:2409] 2025-06-02 14:04:22,004 >> step ok, loss 1.2345\n"
    with open(log, "wb") as fh:
        for _ in range(40):
            fh.write(filler * 2000)
        fh.write(b"z" * (3 * dg.MAX_LINE_BYTES) + b"\n")
        fh.write(b"[rank1]: " + OOM_LINE + b"\n")
    return log


def best_of(repeat: int, work: Callable[[], int]) -> tuple[float, int]:
    """Fastest wall time over ``repeat`` runs, and the line count the work reported."""
    best, count = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        count = work()
        best = min(best, time.perf_counter() - t0)
    return best, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; best of {a.repeat}")
    with tempfile.TemporaryDirectory(prefix="dsplan-bench-") as d:
        log = _big_log(Path(d))
        size = log.stat().st_size

        def diagnose() -> int:
            if dg.diagnose_file(log).verdict != "gpu_oom":
                raise SystemExit("diagnose_file missed the OOM at the end of the big log")
            return 80_002

        rows = [
            ("two 1 MiB lines", huge_lines, 1.0),
            ("256 KiB of random bytes", feeder(_garbage()), 5.0),
            ("ordinary torchrun log x200", feeder(_ordinary()), 15.0),
            (f"diagnose_file, {size / 2**20:.1f} MiB log", diagnose, 30.0),
        ]
        for name, work, old_bound in rows:
            seconds, lines = best_of(a.repeat, work)
            rate = f"{lines / seconds:12,.0f} lines/s" if lines > 2 else " " * 20
            print(f"  {name:32s} {seconds:7.3f} s  {rate}  (the test's old bound: {old_bound:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
