"""Against a real Slurm (slurmctld + 2 slurmd, one per network namespace): steps, ending them, sbatch, teardown."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from dsplan.emit.slurm import SbatchOptions, render_sbatch
from dsplan.inputs.hardware import make_profile
from dsplan.launch.slurm import (Allocation, end_step, master_port, parse_banner, parse_label,
                                 srun_argv, step_running, task_argv)
from tests.conftest import REPO
from tests.slurm_cluster import SlurmCluster, pids_with, require_slurm

pytestmark = pytest.mark.slurm

# What each node's task reports: its host, the torchrun variables the wrapper set, and how MASTER_ADDR resolves.
REPORT = ("import os, socket; e = os.environ; print('SEEN', socket.gethostname(), e['NODE_RANK'], e['NNODES'], "
          "e['MASTER_ADDR'], e['MASTER_PORT'], e['FORCE_TORCHRUN'], e['NPROC_PER_NODE'], "
          "e.get('CUDA_VISIBLE_DEVICES'), socket.gethostbyname(e['MASTER_ADDR']), flush=True)")

# A rank that never returns and ignores SIGTERM and SIGINT (a rank stuck in a collective is no more
# cooperative); node rank 1 first prints a real-format HIP OOM line.
BLOCKER = textwrap.dedent("""\
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("ready", flush=True)
    if os.environ["NODE_RANK"] == "1":
        time.sleep(0.5)
        print("[rank1]: torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
              "total capacity of 63.98 GiB of which 1.10 GiB is free.", flush=True)
    while True:
        time.sleep(3600)
""")


def wait_job(cluster: SlurmCluster, job: str, timeout: float = 60) -> str:
    """Poll until the job has ended; returns its final state (``sbatch --wait`` polls every 10 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        show = cluster.run("scontrol", "show", "job", job, "-o", check=False).stdout
        state = re.search(r"JobState=(\S+)", show)
        if state and state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state.group(1)
        time.sleep(0.2)
    raise AssertionError(f"job {job} still running after {timeout} s\n{cluster.logs()}")


def allocate(cluster: SlurmCluster) -> Allocation:
    """A 2-node allocation held without a shell (``salloc --no-shell``), as sbatch would give the controller."""
    r = cluster.run("salloc", "--no-shell", "--nodes=2", "--ntasks-per-node=1", "--exclusive")
    job = re.search(r"allocation (\d+)", r.stderr).group(1)
    show = cluster.run("scontrol", "show", "job", job, "-o").stdout
    env = {"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": re.search(r" NodeList=(\S+)", show).group(1),
           "SLURM_NNODES": "2", "SLURM_JOB_CPUS_PER_NODE": f"{cluster.cpus}(x2)", "SLURM_CONF": str(cluster.conf)}
    return Allocation.detect(env)


class StepOutput:
    """srun's merged output, read on a thread, line by line with the label parsed."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[tuple] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.put((time.monotonic(), *parse_label(line.rstrip("\n"))))
        self.lines.put(None)

    def until(self, test, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                break
            self.seen.append(item)
            if test(*item[1:]):
                return item
        raise AssertionError(f"not seen; output so far: {self.seen}")


def step_env(cluster: SlurmCluster) -> dict:
    return dict(cluster.env, PYTHONPATH=str(REPO))


# --------------------------------------------------------------------------- one step on both nodes


def test_rendered_sbatch_runs_the_controller_once_on_the_batch_host(slurm_cluster, tmp_path):
    """render_sbatch -> sbatch --test-only -> sbatch: the controller starts on n1 and runs one step on both nodes."""
    controller = tmp_path / "controller.py"
    controller.write_text(textwrap.dedent(f"""\
        import json, os, socket, subprocess, sys
        from dsplan.launch.slurm import Allocation, master_port, srun_argv, task_argv
        alloc = Allocation.detect(os.environ)
        port = master_port(alloc.job_id, 1)
        inner = task_argv([sys.executable, "-c", {REPORT!r}], master_addr=alloc.master_addr, master_port=port,
                          nproc_per_node=2, mask_var="CUDA_VISIBLE_DEVICES")
        r = subprocess.run(srun_argv(alloc, inner, step_name="dsplan-a1"), capture_output=True, text=True)
        print(json.dumps(dict(host=socket.gethostname(), hosts=alloc.hostnames(), nnodes=alloc.nnodes,
                              cpus=alloc.cpus_per_node, port=port, rc=r.returncode, out=r.stdout, err=r.stderr,
                              site=os.environ.get("DSPLAN_SITE"))))
    """))
    profile = make_profile("2x2x16G", cpu_cores=slurm_cluster.cpus)
    script = tmp_path / "dsplan.sbatch"
    script.write_text(render_sbatch(
        profile, [sys.executable, str(controller)],
        SbatchOptions(job_name="dsplan test", partition="debug", time="10", workdir=str(tmp_path),
                      output="slurm-%j.out"),
        site={"env": {"DSPLAN_SITE": "a b"}, "setup": ["echo site-setup-ran >&2"]}))
    env = step_env(slurm_cluster)
    assert slurm_cluster.run("sbatch", "--test-only", str(script), env=env, check=False).returncode == 0
    job = slurm_cluster.run("sbatch", "--parsable", str(script), env=env).stdout.strip()
    assert wait_job(slurm_cluster, job) == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()
    show = slurm_cluster.run("scontrol", "show", "job", job, "-o").stdout
    assert "JobName=dsplan test" in show and "NumNodes=2" in show and "TresPerNode=gres:gpu:2" in show
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "site-setup-ran" in log
    result = json.loads(log.splitlines()[-1])
    assert (result["host"], result["hosts"], result["nnodes"], result["rc"], result["site"]) == \
        ("n1", ["n1", "n2"], 2, 0, "a b")
    assert result["cpus"] == slurm_cluster.cpus
    seen = {}
    for task, text in map(parse_label, result["out"].splitlines()):
        if text.startswith("SEEN"):
            seen[task] = text.split()[1:]
    n1_addr = slurm_cluster.address("n1")
    assert seen == {0: ["n1", "0", "2", "n1", str(result["port"]), "1", "2", "0,1", n1_addr],
                    1: ["n2", "1", "2", "n1", str(result["port"]), "1", "2", "0,1", n1_addr]}
    banners = [parse_banner(text) for _, text in map(parse_label, result["err"].splitlines())]
    assert sorted((b["node"], b["node_rank"]) for b in banners if b) == [("n1", "0"), ("n2", "1")]


# --------------------------------------------------------------------------- ending a step


def _start_blocking_step(cluster: SlurmCluster, alloc: Allocation, marker: str, attempt: int):
    argv = srun_argv(alloc, task_argv([sys.executable, "-c", BLOCKER, marker], master_addr=alloc.master_addr,
                                      master_port=master_port(alloc.job_id, attempt), nproc_per_node=1,
                                      mask_var="CUDA_VISIBLE_DEVICES"), step_name=f"dsplan-a{attempt}")
    proc = subprocess.Popen(argv, env=step_env(cluster), cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, StepOutput(proc)


def test_end_step_ends_every_task_on_both_nodes_within_5_s(slurm_cluster):
    """Node 2 prints an OOM while node 1 blocks; both ignore SIGTERM/SIGINT.  From the OOM line,
    every task on both nodes is gone within 5 s, and the next attempt starts on both nodes."""
    alloc = allocate(slurm_cluster)
    try:
        marker = f"dsq-block-{uuid.uuid4().hex[:8]}"
        proc, out = _start_blocking_step(slurm_cluster, alloc, marker, attempt=1)
        out.until(lambda task, text: task == 0 and text == "ready")
        oom_at, task, _ = out.until(lambda task, text: "OutOfMemoryError" in text)
        assert alloc.node_of(task) == "n2"
        assert len(pids_with(marker)) == 2  # one blocked rank per node
        ended = end_step(proc, alloc.job_id, "dsplan-a1", env=slurm_cluster.env)
        gone_after = time.monotonic() - oom_at
        assert ended.gone and ended.step == f"{alloc.job_id}.0"
        assert proc.wait(1) != 0
        assert pids_with(marker) == [] and not step_running(ended.step, env=slurm_cluster.env)
        assert gone_after < 5.0, f"{gone_after:.2f} s from the OOM line to every task gone"

        proc2, out2 = _start_blocking_step(slurm_cluster, alloc, marker, attempt=2)
        ranks = {out2.until(lambda task, text: text.startswith("[dsplan-task]"))[2] for _ in range(2)}
        assert {parse_banner(b)["node"] for b in ranks} == {"n1", "n2"}
        assert end_step(proc2, alloc.job_id, "dsplan-a2", env=slurm_cluster.env).gone
    finally:
        slurm_cluster.run("scancel", alloc.job_id, check=False)


def test_end_step_when_srun_already_exited(slurm_cluster):
    """Ending an attempt whose step is over already (kill-on-bad-exit ended it) returns at once."""
    alloc = allocate(slurm_cluster)
    try:
        argv = srun_argv(alloc, ["bash", "-c", 'exit "$SLURM_NODEID"'], step_name="dsplan-a1")
        proc = subprocess.Popen(argv, env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.wait(30) != 0  # task 1 exited 1: the step failed as a whole
        ended = end_step(proc, alloc.job_id, "dsplan-a1", env=slurm_cluster.env)
        assert ended.gone and ended.step is None and not ended.killed_srun and ended.seconds < 2.0
    finally:
        slurm_cluster.run("scancel", alloc.job_id, check=False)


# --------------------------------------------------------------------------- teardown


def test_teardown_leaves_no_process_namespace_link_or_folder():
    """A cluster of its own, stopped with a running 2-node batch job and a 2-node srun step."""
    require_slurm()
    cluster = SlurmCluster(nodes=2).start()
    srun = None
    try:
        script = cluster.base / "block.sh"
        script.write_text("#!/bin/bash\n#SBATCH --nodes=2\nsrun sleep 600\n")
        job = cluster.run("sbatch", "--parsable", "--output=/dev/null", str(script)).stdout.strip()
        srun = subprocess.Popen(["srun", "--nodes=2", "sleep", "600"], env=cluster.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while "RUNNING" not in cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout:
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        names = cluster.footprint()
        assert any(b"slurmstepd" in Path(f"/proc/{p}/cmdline").read_bytes() for p in names["pids"]
                   if Path(f"/proc/{p}").exists())
    finally:
        cluster.stop()
        if srun is not None:
            srun.wait(10)
    assert cluster.leftovers(names) == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in netns for ns in names["netns"])
    assert cluster.stop_seconds < 10
