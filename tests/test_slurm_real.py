"""Against a real Slurm (slurmctld + 2 slurmd, one per network namespace): steps, ending them, sbatch, teardown,
and `dsplan run` in an sbatch job as the one controller of both nodes."""

from __future__ import annotations

import json
import os
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
from dsplan.launch.ledger import read_attempts
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
        assert ended.gone and ended.step is None and not ended.killed_srun  # nothing to cancel, nothing killed
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


# --------------------------------------------------------------------------- dsplan run as the controller

FAKE_NODE = REPO / "tests" / "fakes" / "children" / "fake_lf_node.py"
# 2 nodes x 2 ROCm cards, as the test cluster's nodes have 2 (fake) GPUs each
FAKE_RUN = ["--gpus", "2x2x64G", "--backend", "rocm", "--model", "Qwen2.5-7B", "--method", "lora"]


def node_processes(run_dir: Path) -> dict[int, str]:
    """pid -> node of every live process of the fake per-node CLI (on any node) for this run."""
    found = {}
    for pid in pids_with(str(FAKE_NODE)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in cmd:
            node = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SLURMD_NODENAME=")), "?")
            found[pid] = node
    return found


def submit_controller(cluster: SlurmCluster, tmp_path: Path, profile, command: list[str], env: dict) -> str:
    """Render the sbatch script as ``dsplan render --slurm`` does, check it, submit it; the job id."""
    script = tmp_path / "dsplan.sbatch"
    script.write_text(render_sbatch(profile, command, SbatchOptions(job_name="dsplan-test", time="20",
                                                                    workdir=str(tmp_path), output="slurm-%j.out")))
    assert cluster.run("sbatch", "--test-only", str(script), env=env, check=False).returncode == 0
    return cluster.run("sbatch", "--parsable", str(script), env=env).stdout.strip()


def lock_is_held(run_dir: Path) -> bool:
    import fcntl

    fd = os.open(run_dir / ".dsplan.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_dsplan_run_in_sbatch_ends_every_node_on_an_oom_and_falls_back_once(slurm_cluster, tmp_path):
    """sbatch of the rendered script runs `python -m dsplan run` once, on n1.  Attempt 1 is one srun
    step with a fake llamafactory-cli on each node, 2 ranks each; rank 3 (on n2) prints a HIP OOM
    traceback and every rank on both nodes blocks, ignoring SIGTERM and SIGINT.  dsplan ends the step
    on both nodes, records n2 and rank 3 as the source, and starts attempt 2 on both nodes at the next
    tier, which trains."""
    from tests.conftest import run_dsplan

    ladder = json.loads(run_dsplan("plan", *FAKE_RUN, "--tier", "zero2", "--json").stdout)["ladder"]
    assert ladder[0] == "zero2" and len(ladder) >= 2
    wrapper = tmp_path / "bin" / "llamafactory-cli"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_NODE} node \"$@\"\n")
    wrapper.chmod(0o755)
    run_dir, state = tmp_path / "run", tmp_path / "state"
    state.mkdir()
    env = dict(step_env(slurm_cluster), FAKE_OOM_TIERS="zero2", FAKE_OOM_RANK="3", FAKE_STATE_DIR=str(state))
    command = [sys.executable, "-m", "dsplan", "run", *FAKE_RUN, "--tier", "zero2", "--lf-cli", str(wrapper),
               "--run-dir", str(run_dir), "--stall-timeout", "300"]
    job = submit_controller(slurm_cluster, tmp_path, make_profile("2x2x64G", backend="rocm",
                                                                  cpu_cores=slurm_cluster.cpus), command, env)
    deadline, nodes_seen = time.monotonic() + 120, set()
    while not (state / "oom-at").exists():
        nodes_seen.update(node_processes(run_dir).values())
        assert time.monotonic() < deadline, (tmp_path / f"slurm-{job}.out").read_text() + slurm_cluster.logs()
        time.sleep(0.05)
    oom_at, oom_host = (state / "oom-at").read_text().split()
    assert oom_host == "n2" and lock_is_held(run_dir)  # the controller, and only it, holds the run folder
    while any("attempt-001" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
              for p in node_processes(run_dir)):
        assert time.monotonic() < deadline + 60, node_processes(run_dir)
        time.sleep(0.02)
    gone_after = time.time() - float(oom_at)
    assert wait_job(slurm_cluster, job, timeout=180) == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()
    assert nodes_seen == {"n1", "n2"}
    assert gone_after < 5.0, f"{gone_after:.2f} s from the OOM line until no task of attempt 1 was left"

    first, second = read_attempts(run_dir)
    assert (first["tier"], first["verdict"], second["tier"], second["verdict"]) == \
        ("zero2", "gpu_oom", ladder[1], "success")
    assert (first["evidence_node"], first["evidence_rank"], first["nodes"]) == ("n2", 3, ["n1", "n2"])
    assert first["evidence"].startswith("torch.OutOfMemoryError: HIP out of memory")
    assert first["slurm_step"] == f"{job}.0" and second["nodes"] == ["n1", "n2"] and second["slurm_job"] == job
    log2 = (run_dir / "attempt-002" / "train.log").read_text()
    banners = [parse_banner(text) for _, text in map(parse_label, log2.splitlines())]
    assert sorted((b["node"], b["node_rank"], b["step"]) for b in banners if b) == \
        [("n1", "0", f"{job}.1"), ("n2", "1", f"{job}.1")]
    ranks = {int(m.group(1)): m.group(2) for m in re.finditer(r"Process rank: (\d), world size: 4, .*node: (n\d)",
                                                              log2)}
    assert ranks == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert out.count("falling back") == 1 and f"falling back zero2 -> {ladder[1]}" in out


def test_scancel_of_the_job_is_recorded_as_interrupted(slurm_cluster, tmp_path):
    """scancel sends SIGTERM to the controller and to srun at once; the attempt is recorded as
    interrupted (not as a failed training), and no task is left on either node."""
    wrapper = tmp_path / "bin" / "llamafactory-cli"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_NODE} node \"$@\"\n")
    wrapper.chmod(0o755)
    run_dir = tmp_path / "run"
    # every rank blocks (FAKE_OOM_TIERS) and none prints an OOM (FAKE_OOM_RANK=-1)
    env = dict(step_env(slurm_cluster), FAKE_OOM_TIERS="zero2", FAKE_OOM_RANK="-1", FAKE_STATE_DIR=str(tmp_path))
    command = [sys.executable, "-m", "dsplan", "run", *FAKE_RUN, "--tier", "zero2", "--lf-cli", str(wrapper),
               "--run-dir", str(run_dir)]
    job = submit_controller(slurm_cluster, tmp_path, make_profile("2x2x64G", backend="rocm",
                                                                  cpu_cores=slurm_cluster.cpus), command, env)
    deadline = time.monotonic() + 120
    while sorted(set(node_processes(run_dir).values())) != ["n1", "n2"]:
        assert time.monotonic() < deadline, (tmp_path / f"slurm-{job}.out").read_text() + slurm_cluster.logs()
        time.sleep(0.1)
    slurm_cluster.run("scancel", job)
    assert wait_job(slurm_cluster, job, timeout=60) == "CANCELLED"
    assert node_processes(run_dir) == {}
    (attempt,) = read_attempts(run_dir)
    assert attempt["verdict"] == "interrupted" and not attempt.get("unfinished"), attempt
    assert attempt["nodes"] == ["n1", "n2"]


@pytest.mark.real
def test_real_llamafactory_on_two_nodes_through_the_rendered_sbatch(slurm_cluster, tmp_path, train_python):
    """The real llamafactory-cli on the tiny demo model, one rank per node, gloo, fp32, zero3: `dsplan render
    --slurm` writes the script, sbatch runs its `dsplan run` as the controller, the run succeeds, and the
    ranks saw world size 2."""
    import yaml

    from dsplan.demo.assets import make_demo_assets

    model_dir, data_dir, dataset = make_demo_assets(tmp_path / "assets")
    user = {"model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": dataset, "dataset_dir": str(data_dir), "template": "qwen", "cutoff_len": 128,
            "flash_attn": "sdpa", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
            "max_steps": 2, "logging_steps": 1, "save_steps": 100000, "report_to": "none",
            "preprocessing_num_workers": 1, "dataloader_num_workers": 0}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(user))
    out = tmp_path / "out"
    r = subprocess.run([train_python, "-m", "dsplan", "render", str(tmp_path / "train.yaml"), "--gpus", "2x1x16G",
                        "--precision", "fp32", "--tier", "zero3", "--slurm", "--time", "20", "-o", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    script = out / "dsplan.sbatch"
    assert " run " in script.read_text() and "--precision fp32" in script.read_text()
    # DeepSpeed's JIT ops are built once per folder: every node uses the one this machine already has
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    env = dict(step_env(slurm_cluster), TORCH_EXTENSIONS_DIR=ext, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    assert slurm_cluster.run("sbatch", "--test-only", str(script), env=env, check=False).returncode == 0
    job = slurm_cluster.run("sbatch", "--parsable", str(script), env=env).stdout.strip()
    state = wait_job(slurm_cluster, job, timeout=900)
    run_dir = out / "run"
    log = (run_dir / "attempt-001" / "train.log").read_text(errors="replace") if run_dir.exists() else ""
    slurm_out = "".join(p.read_text(errors="replace") for p in tmp_path.glob(f"slurm-*{job}.out"))
    assert state == "COMPLETED", slurm_out[-3000:] + log[-4000:]
    (attempt,) = read_attempts(run_dir)
    assert attempt["verdict"] == "success" and attempt["nodes"] == ["n1", "n2"] and attempt["tier"] == "zero3"
    assert "world size: 2" in log
    lines = [parse_label(line) for line in log.splitlines()]
    assert {task for task, text in lines if "world size: 2" in text} == {0, 1}  # one rank on each node
    assert {parse_banner(text)["node"] for _, text in lines if parse_banner(text)} == {"n1", "n2"}
    steps = [json.loads(x) for x in (Path(attempt["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    assert [s["current_steps"] for s in steps if "loss" in s] == [1, 2]
