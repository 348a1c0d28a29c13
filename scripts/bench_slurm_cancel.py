#!/usr/bin/env python3
"""How fast a 2-node Slurm step is ended on an OOM, from the OOM line to every task gone.

Starts a private test cluster (tests/slurm_cluster.py: slurmctld + 2 slurmd in
network namespaces, KillWait=30 as on real sites).  Two modes:

* default: holds one 2-node allocation, and per trial starts one step where both
  tasks ignore SIGTERM and SIGINT and block forever; node 2's task first prints a
  HIP OOM line.  The bench reads srun's labelled output and calls end_step on that
  line.  Reported per trial: seconds from reading the OOM line until no task process
  is left on either node, until end_step returned (srun exited and the step left
  squeue), and srun's exit code.  With --srun-kill-only, also shows what SIGKILL to
  srun alone (no scancel) leaves behind.
* --dsplan-run: the whole thing as users run it.  Per trial, sbatch of the script
  dsplan.emit.slurm.render_sbatch writes, whose body runs ``python -m dsplan run`` (the
  controller) with the fake per-node llamafactory-cli tests/fakes/children/fake_lf_node.py:
  2 ranks per node, all blocking and ignoring SIGTERM and SIGINT, rank 3 (on n2) printing a
  HIP OOM traceback at zero2.  Reported per trial: seconds from the OOM line (the rank's own
  clock) until no process of attempt 1 is left on either node; the end_step time the ledger
  recorded; seconds until attempt 2 runs on both nodes; and the node and rank the ledger
  names.

Needs root and scripts/setup_slurm.sh.  Usage:
    python scripts/bench_slurm_cancel.py [--trials 5] [--srun-kill-only]
    python scripts/bench_slurm_cancel.py --dsplan-run [--trials 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsplan.emit.slurm import SbatchOptions, render_sbatch  # noqa: E402
from dsplan.inputs.hardware import make_profile  # noqa: E402
from dsplan.launch.ledger import read_attempts  # noqa: E402
from dsplan.launch.slurm import Allocation, end_step, master_port, parse_label, srun_argv, task_argv  # noqa: E402
from tests.slurm_cluster import SlurmCluster, missing_packages, pids_with  # noqa: E402

FAKE_NODE = REPO / "tests" / "fakes" / "children" / "fake_lf_node.py"
RUN_ARGS = ["--gpus", "2x2x64G", "--backend", "rocm", "--model", "Qwen2.5-7B", "--method", "lora", "--tier", "zero2"]

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


# --------------------------------------------------------------------------- dsplan run end to end


def attempt_pids(run_dir: Path, attempt: str) -> set[str]:
    """The nodes on which a process of the fake CLI for ``attempt`` (``attempt-001``) is alive."""
    nodes = set()
    for pid in pids_with(str(FAKE_NODE)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{run_dir}/{attempt}/".encode() in cmd:
            nodes.update(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SLURMD_NODENAME="))
    return nodes


def submit_run(cluster: SlurmCluster, work: Path) -> tuple[str, Path, Path]:
    """sbatch of the rendered script running ``python -m dsplan run`` with the fake per-node CLI."""
    wrapper = work / "bin" / "llamafactory-cli"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_NODE} node \"$@\"\n")
    wrapper.chmod(0o755)
    run_dir, state = work / "run", work / "state"
    state.mkdir()
    command = [sys.executable, "-m", "dsplan", "run", *RUN_ARGS, "--lf-cli", str(wrapper), "--run-dir", str(run_dir)]
    script = work / "dsplan.sbatch"
    script.write_text(render_sbatch(make_profile("2x2x64G", backend="rocm", cpu_cores=cluster.cpus), command,
                                    SbatchOptions(time="10", workdir=str(work), output="slurm-%j.out")))
    env = dict(cluster.env, PYTHONPATH=str(REPO), FAKE_OOM_TIERS="zero2", FAKE_OOM_RANK="3",
               FAKE_STATE_DIR=str(state))
    job = cluster.run("sbatch", "--parsable", str(script), env=env).stdout.strip()
    return job, run_dir, state


def run_trial(cluster: SlurmCluster, work: Path) -> dict:
    job, run_dir, state = submit_run(cluster, work)
    deadline = time.monotonic() + 120
    while not (state / "oom-at").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no OOM line within 120 s; job {job}:\n" + cluster.logs())
        time.sleep(0.005)
    oom_at = float((state / "oom-at").read_text().split()[0])
    while attempt_pids(run_dir, "attempt-001"):
        time.sleep(0.005)
    gone = time.time() - oom_at
    while attempt_pids(run_dir, "attempt-002") != {"n1", "n2"}:
        if time.monotonic() > deadline + 60:
            raise SystemExit("attempt 2 did not start on both nodes")
        time.sleep(0.005)
    next_at = time.time() - oom_at
    while cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip():
        time.sleep(0.1)
    first = read_attempts(run_dir)[0]
    return {"gone": gone, "next": next_at, "end_step": first.get("step_end_seconds"),
            "source": f"{first.get('evidence_node')}/rank {first.get('evidence_rank')}", "verdict": first["verdict"]}


def bench_dsplan_run(cluster: SlurmCluster, trials: int) -> None:
    rows = []
    for i in range(1, trials + 1):
        work = Path(tempfile.mkdtemp(prefix="dsbench"))
        try:
            r = run_trial(cluster, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append(r)
        print(f"trial {i}: {r['verdict']} from {r['source']}; every task of attempt 1 gone {r['gone']:.3f} s after "
              f"the OOM line (end_step inside dsplan {r['end_step']:.3f} s); attempt 2 on both nodes after "
              f"{r['next']:.3f} s")
    gone = [r["gone"] for r in rows]
    print(f"dsplan run, 2 nodes x 2 ranks: tasks gone median {statistics.median(gone):.3f} s, max {max(gone):.3f} s "
          f"(bound 5 s); attempt 2 on both nodes median {statistics.median(r['next'] for r in rows):.3f} s "
          f"({trials} trials)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--srun-kill-only", action="store_true")
    ap.add_argument("--dsplan-run", action="store_true", help="drive `dsplan run` under sbatch end to end")
    args = ap.parse_args()
    if missing_packages() or os.geteuid() != 0:
        raise SystemExit(f"needs root and {missing_packages()}: run scripts/setup_slurm.sh")
    cluster = SlurmCluster(nodes=2).start()
    print(f"cluster up in {cluster.start_seconds:.2f} s (KillWait=30; tasks ignore SIGTERM and SIGINT)")
    try:
        if args.dsplan_run:
            bench_dsplan_run(cluster, args.trials)
            return
        bench_end_step(cluster, args.trials, args.srun_kill_only)
    finally:
        cluster.stop()
        print(f"cluster down in {cluster.stop_seconds:.2f} s")


def bench_end_step(cluster: SlurmCluster, trials: int, srun_kill: bool) -> None:
    alloc = allocate(cluster)
    gone, returned = [], []
    for attempt in range(1, trials + 1):
        g, r, code, node = trial(cluster, alloc, attempt)
        gone.append(g)
        returned.append(r)
        print(f"trial {attempt}: OOM on {node}; every task gone {g:.3f} s, end_step returned {r:.3f} s "
              f"after the OOM line; srun exit {code}")
    print(f"tasks gone: median {statistics.median(gone):.3f} s, max {max(gone):.3f} s; "
          f"end_step: median {statistics.median(returned):.3f} s, max {max(returned):.3f} s "
          f"({trials} trials, 2 nodes, bound 5 s)")
    if srun_kill:
        srun_kill_only(cluster, alloc)
    cluster.run("scancel", alloc.job_id, check=False)


if __name__ == "__main__":
    main()
