#!/usr/bin/env python3
"""How fast dsplan.launch.slurm.end_step ends a 2-node step, from the OOM line to every task gone.

Starts a private test cluster (tests/slurm_cluster.py: slurmctld + 2 slurmd in
network namespaces, KillWait=30 as on real sites), holds one 2-node allocation,
and per trial starts one step where both tasks ignore SIGTERM and SIGINT and
block forever; node 2's task first prints a HIP OOM line.  The controller side
reads srun's labelled output and calls end_step on that line.  Reported per
trial: seconds from reading the OOM line until no task process is left on
either node, until end_step returned (srun exited and the step left squeue),
and srun's exit code.  With --srun-kill-only, also shows what SIGKILL to srun
alone (no scancel) leaves behind.

Needs root and scripts/setup_slurm.sh.  Usage:
    python scripts/bench_slurm_cancel.py [--trials 5] [--srun-kill-only]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsplan.launch.slurm import Allocation, end_step, master_port, parse_label, srun_argv, task_argv  # noqa: E402
from tests.slurm_cluster import SlurmCluster, missing_packages, pids_with  # noqa: E402

BLOCKER = """\
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
if os.environ["NODE_RANK"] == "1":
    time.sleep(0.5)
    print("[rank1]: torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB.", flush=True)
while True:
    time.sleep(3600)
"""


def allocate(cluster: SlurmCluster) -> Allocation:
    r = cluster.run("salloc", "--no-shell", "--nodes=2", "--ntasks-per-node=1", "--exclusive")
    job = re.search(r"allocation (\d+)", r.stderr).group(1)
    nodelist = re.search(r" NodeList=(\S+)", cluster.run("scontrol", "show", "job", job, "-o").stdout).group(1)
    return Allocation.detect({"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": "2",
                              "SLURM_JOB_CPUS_PER_NODE": f"{cluster.cpus}(x2)", "SLURM_CONF": str(cluster.conf)})


def start_step(cluster: SlurmCluster, alloc: Allocation, attempt: int, marker: str):
    """The step, and an event set (with the time) when node 2's OOM line is read."""
    argv = srun_argv(alloc, task_argv([sys.executable, "-c", BLOCKER, marker], master_addr=alloc.master_addr,
                                      master_port=master_port(alloc.job_id, attempt), nproc_per_node=1,
                                      mask_var="CUDA_VISIBLE_DEVICES"), step_name=f"bench-a{attempt}")
    proc = subprocess.Popen(argv, env=dict(cluster.env, PYTHONPATH=str(REPO)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = {"oom": threading.Event()}

    def read():
        for line in proc.stdout:
            task, text = parse_label(line.rstrip("\n"))
            if "OutOfMemoryError" in text and not seen["oom"].is_set():
                seen["at"], seen["node"] = time.monotonic(), alloc.node_of(task)
                seen["oom"].set()

    threading.Thread(target=read, daemon=True).start()
    return proc, seen


def trial(cluster: SlurmCluster, alloc: Allocation, attempt: int) -> tuple[float, float, int, str]:
    marker = f"bench-{uuid.uuid4().hex[:8]}"
    proc, seen = start_step(cluster, alloc, attempt, marker)
    if not seen["oom"].wait(60):
        raise SystemExit("no OOM line within 60 s")
    gone_at = {}

    def watch():  # from the OOM line on, the first moment no task is left on any node
        while pids_with(marker):
            time.sleep(0.005)
        gone_at["t"] = time.monotonic()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    end_step(proc, alloc.job_id, f"bench-a{attempt}", env=cluster.env)
    returned = time.monotonic() - seen["at"]
    watcher.join(30)
    return gone_at["t"] - seen["at"], returned, proc.wait(5), seen["node"]


def srun_kill_only(cluster: SlurmCluster, alloc: Allocation) -> None:
    """SIGKILL srun alone: do the tasks on the nodes end?"""
    marker = f"bench-{uuid.uuid4().hex[:8]}"
    proc, seen = start_step(cluster, alloc, 99, marker)
    seen["oom"].wait(60)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while pids_with(marker) and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    left = pids_with(marker)
    print(f"SIGKILL to srun only (no scancel): tasks {'still running' if left else 'gone'} "
          f"{time.monotonic() - t0:.3f} s later")
    end_step(None, alloc.job_id, "bench-a99", env=cluster.env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--srun-kill-only", action="store_true")
    args = ap.parse_args()
    if missing_packages() or os.geteuid() != 0:
        raise SystemExit(f"needs root and {missing_packages()}: run scripts/setup_slurm.sh")
    cluster = SlurmCluster(nodes=2).start()
    print(f"cluster up in {cluster.start_seconds:.2f} s (KillWait=30; tasks ignore SIGTERM and SIGINT)")
    try:
        alloc = allocate(cluster)
        gone, returned = [], []
        for attempt in range(1, args.trials + 1):
            g, r, code, node = trial(cluster, alloc, attempt)
            gone.append(g)
            returned.append(r)
            print(f"trial {attempt}: OOM on {node}; every task gone {g:.3f} s, end_step returned {r:.3f} s "
                  f"after the OOM line; srun exit {code}")
        print(f"tasks gone: median {statistics.median(gone):.3f} s, max {max(gone):.3f} s; "
              f"end_step: median {statistics.median(returned):.3f} s, max {max(returned):.3f} s "
              f"({args.trials} trials, 2 nodes, bound 5 s)")
        if args.srun_kill_only:
            srun_kill_only(cluster, alloc)
    finally:
        cluster.stop()
        print(f"cluster down in {cluster.stop_seconds:.2f} s")


if __name__ == "__main__":
    main()
