#!/usr/bin/env python3
"""How fast does dsplan take down a multi-rank run after a GPU out-of-memory line?

Runs the fake 8-rank job (tests/fakes/children/fake_ranks.py: one rank prints a
real-format ``torch.OutOfMemoryError``, the others hang as ranks in an NCCL
collective would) through ``dsplan.launch.attempt.run_attempt`` several times and
prints min / median / max seconds from the moment the OOM line was printed
(stamped by the fake) to the moment no process of the job is left.  No GPU,
torch or DeepSpeed needed.

    python scripts/bench_kill.py [--runs 10] [--ranks 8] [--ignore-term] [--grace 3] [--torchrun | --orphaned]

``--torchrun`` uses the real torchrun (needs torch installed; the ranks are still
fakes that import nothing) instead of the fake one, so its own shutdown is timed too.
``--orphaned`` lets the fake torchrun die before the OOM, with its ranks in sessions
of their own and dsplan's periodic process listing turned off, so the ranks can only
be found through the output pipes they hold.

These figures used to be asserts in tests/test_launcher.py (all gone within 2 s of
the OOM line; within the grace period plus 2 s when SIGTERM is ignored); the tests
now check only that nothing is left, and this script says how fast.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from dsplan.launch import attempt
from dsplan.launch.proctree import running as still_running
from dsplan.logs.classifier import Classifier

FAKE = REPO / "tests" / "fakes" / "children" / "fake_ranks.py"
RANK = REPO / "tests" / "fakes" / "children" / "torchrun_rank.py"


def one_run(ranks: int, ignore_term: bool, grace: float, torchrun: bool,
            orphaned: bool = False) -> tuple[float, float, str]:
    with tempfile.TemporaryDirectory(prefix="dsplan-bench-") as d:
        d = Path(d)
        files = ["--pid-file", str(d / "pids"), "--oom-stamp", str(d / "stamp")]
        if torchrun:
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                    str(RANK), "--oom-rank", str(min(3, ranks - 1)), "--oom-after", "2.0", "--worker", *files]
        else:
            argv = [sys.executable, str(FAKE), "--ranks", str(ranks), "--oom-rank", str(min(3, ranks - 1)),
                    "--oom-after", "1.0", "--backend", "cuda", *files]
            if ignore_term:
                argv.append("--ignore-term")
            if orphaned:
                argv += ["--die-after", "0.3", "--escapee", "session"]
        out = attempt.run_attempt(argv, dict(os.environ), d, d / "attempt.log", None, Classifier(),
                          stall_timeout=120, grace=grace, echo=False, progress=False)
        pids = [int(x) for x in (d / "pids").read_text().split()] + [out.pid]
        while still_running(pids):
            time.sleep(0.001)
        gone = time.time()
        printed = float((d / "stamp").read_text())
        if out.decided_at is None:
            raise SystemExit(f"run ended without a kill decision: verdict {out.finding.verdict}")
        return gone - printed, out.cleared_at - out.decided_at, out.finding.verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--ignore-term", action="store_true", help="ranks ignore SIGTERM: measures the SIGKILL path")
    ap.add_argument("--grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL (default 3)")
    ap.add_argument("--torchrun", action="store_true", help="launch the fake ranks with the real torchrun")
    ap.add_argument("--orphaned", action="store_true",
                    help="the fake torchrun dies first; the ranks are found by the pipes they hold")
    a = ap.parse_args()
    if a.torchrun and (a.ignore_term or a.orphaned):
        ap.error("--ignore-term and --orphaned work with the fake torchrun only")
    if a.orphaned:  # as tests/test_launcher.py does: the ranks must never have been listed
        attempt._DRAIN_AFTER_EXIT = 1.0
        attempt._REFRESH_EVERY = 3600.0
    ignoring = f", SIGTERM ignored (grace {a.grace:g} s)" if a.ignore_term else ""
    launcher = "the real torchrun" if a.torchrun else "a fake torchrun"
    if a.orphaned:
        launcher += " that dies first"
    print(f"classifier: dsplan.logs.classifier; {a.runs} runs of {a.ranks} fake ranks under {launcher}{ignoring}; "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    total, internal = [], []
    for i in range(a.runs):
        t, k, verdict = one_run(a.ranks, a.ignore_term, a.grace, a.torchrun, a.orphaned)
        total.append(t)
        internal.append(k)
        print(f"  run {i + 1:2d}: {t:.3f} s from OOM line to all gone ({k:.3f} s of teardown); verdict {verdict}")
    for name, xs in (("OOM line -> all processes gone", total), ("kill decision -> all gone", internal)):
        print(f"{name}: min {min(xs):.3f} s, median {statistics.median(xs):.3f} s, max {max(xs):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
