"""Slurm launch and sbatch rendering without a cluster: argv, labels, the per-node wrapper, the script."""

from __future__ import annotations

import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dsplan.emit.slurm import SBATCH_NAME, SbatchOptions, render_sbatch
from dsplan.schema.slurm import check_site
from dsplan.errors import UserError
from dsplan.inputs.hardware import make_profile
from dsplan.launch import slurm_task
from dsplan.launch.slurm import (PORT_BASE, PORT_SPAN, Allocation, cancel_step, find_step, master_port,
                                 parse_banner, parse_label, srun_argv, task_argv)
from tests.conftest import REPO
from tests.slurm_cluster import require_slurm

JOB_ENV = {"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
           "SLURM_JOB_CPUS_PER_NODE": "64(x2)"}


def fake_command(tmp_path: Path, name: str, body: str) -> dict:
    """An executable ``name`` on a PATH of its own; returns the environment that finds it first."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


# --------------------------------------------------------------------------- allocation


def test_outside_an_allocation_there_is_none():
    assert Allocation.detect({"PATH": "/usr/bin"}) is None
    assert Allocation.detect({"SLURM_JOB_ID": "3"}) is None  # no node list: not something to launch on
    assert Allocation.detect(dict(JOB_ENV, SLURM_STEP_ID="0")) is None  # a task of a step is not the controller


def test_allocation_from_slurm_environment(tmp_path):
    env = dict(JOB_ENV, **fake_command(tmp_path, "scontrol", 'test "$3" = "gpu[07-08]" && printf "gpu07\\ngpu08\\n"'))
    alloc = Allocation.detect(env)
    assert (alloc.job_id, alloc.nodelist, alloc.nnodes, alloc.cpus_per_node) == ("4711", "gpu[07-08]", 2, 64)
    assert alloc.hostnames() == ["gpu07", "gpu08"]
    assert alloc.master_addr == "gpu07"
    assert [alloc.node_of(t) for t in (0, 1, 2, None)] == ["gpu07", "gpu08", None, None]


@pytest.mark.parametrize("cpus, expected", [("64(x2)", 64), ("64(x2),32", 32), ("48", 48), ("", None), ("x", None)])
def test_cpus_per_node_is_the_smallest_node(cpus, expected):
    env = dict(JOB_ENV, SLURM_JOB_CPUS_PER_NODE=cpus)
    assert Allocation.detect(env).cpus_per_node == expected


def test_cpus_fall_back_to_cpus_per_task():
    env = dict(JOB_ENV, SLURM_JOB_CPUS_PER_NODE="", SLURM_CPUS_PER_TASK="16")
    assert Allocation.detect(env).cpus_per_node == 16


def test_node_count_from_the_host_list_when_slurm_omits_it(tmp_path):
    env = {k: v for k, v in JOB_ENV.items() if k != "SLURM_NNODES"}
    env.update(fake_command(tmp_path, "scontrol", 'printf "a\\nb\\nc\\n"'))
    assert Allocation.detect(env).nnodes == 3


# --------------------------------------------------------------------------- step argv


def test_srun_argv_is_one_task_per_node_killed_together():
    alloc = Allocation("4711", "gpu[07-08]", 2, cpus_per_node=64)
    argv = srun_argv(alloc, ["llamafactory-cli", "train", "lf.yaml"], step_name="dsplan-a3")
    assert argv == ["srun", "--jobid=4711", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "--export=ALL", "--mem=0", "--job-name=dsplan-a3", "--cpus-per-task=64", "--label",
                    "llamafactory-cli", "train", "lf.yaml"]


def test_srun_argv_options():
    alloc = Allocation("9", "n1", 1)
    argv = srun_argv(alloc, ["x"], label=False, wait_s=30, cpus_per_task=4, extra=["--overlap"])
    assert "--label" not in argv and "--wait=30" in argv and "--cpus-per-task=4" in argv
    assert argv[-2:] == ["--overlap", "x"]
    assert not any(a.startswith("--cpus-per-task") for a in srun_argv(alloc, ["x"]))  # unknown: leave it to Slurm


def test_task_argv_wraps_the_command():
    argv = task_argv(["llamafactory-cli", "train", "a b.yaml"], master_addr="n1", master_port=20001,
                     nproc_per_node=8, mask_var="HIP_VISIBLE_DEVICES", python="/venv/bin/python")
    assert argv[:3] == ["/venv/bin/python", "-m", "dsplan.launch.slurm_task"]
    assert argv[argv.index("--"):] == ["--", "llamafactory-cli", "train", "a b.yaml"]
    args = slurm_task.parse_args(argv[3:])
    assert (args.master_addr, args.master_port, args.nproc_per_node, args.mask_var, args.mask) == \
        ("n1", 20001, 8, "HIP_VISIBLE_DEVICES", None)
    assert args.command == ["llamafactory-cli", "train", "a b.yaml"]


def test_master_port_is_per_job_and_attempt_and_skips_busy_ports():
    ports = [master_port("4711", a) for a in range(1, 6)]
    assert len(set(ports)) == 5 and all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert master_port("4711", 1) == ports[0]
    assert master_port("4712", 1) != ports[0]
    with socket.socket() as s:
        s.bind(("", ports[1]))
        s.listen()
        assert master_port("4711", 2) != ports[1]


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize("line, expected", [
    ("0: {'loss': 1.2}", (0, "{'loss': 1.2}")),
    (" 7: [rank7]: torch.OutOfMemoryError: HIP OOM", (7, "[rank7]: torch.OutOfMemoryError: HIP OOM")),
    ("12: a: b", (12, "a: b")),
    ("1: ", (1, "")),
    ("srun: error: n2: task 1: Exited with exit code 1", (None, "srun: error: n2: task 1: Exited with exit code 1")),
    ("0 not a label", (None, "0 not a label")),
])
def test_parse_label(line, expected):
    assert parse_label(line) == expected


def test_banner_fields():
    text = "[dsplan-task] node=n2 node_rank=1 nnodes=2 step=5.3 master=n1:20001 nproc=8 HIP_VISIBLE_DEVICES=0,1"
    assert parse_banner(text)["node_rank"] == "1" and parse_banner(text)["step"] == "5.3"
    assert parse_banner("{'loss': 1.0}") is None


# --------------------------------------------------------------------------- the per-node wrapper


def _args(**kw):
    base = ["--master-addr", "n1", "--master-port", "20001", "--nproc-per-node", "2", "--mask-var",
            kw.pop("mask_var", "HIP_VISIBLE_DEVICES")]
    return slurm_task.parse_args(base + kw.pop("extra", []) + ["--", "true"])


def test_task_env_sets_the_torchrun_variables_from_slurm():
    env = slurm_task.task_env({"SLURM_NODEID": "1", "SLURM_STEP_NUM_NODES": "2", "NODE_RANK": "0",
                               "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_STEP_GPUS": "0,1"}, _args())
    assert {k: env[k] for k in ("NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT", "FORCE_TORCHRUN",
                                "NPROC_PER_NODE")} == {"NODE_RANK": "1", "NNODES": "2", "MASTER_ADDR": "n1",
                                                       "MASTER_PORT": "20001", "FORCE_TORCHRUN": "1",
                                                       "NPROC_PER_NODE": "2"}
    assert env["HIP_VISIBLE_DEVICES"] == "0,1" and "CUDA_VISIBLE_DEVICES" not in env  # exactly one mask


def test_cuda_mask_keeps_the_devices_slurm_gave_the_step():
    env = slurm_task.task_env({"SLURM_NODEID": "0", "SLURM_STEP_GPUS": "4,5", "CUDA_VISIBLE_DEVICES": "4,5",
                               "HIP_VISIBLE_DEVICES": "0,1"}, _args(mask_var="CUDA_VISIBLE_DEVICES"))
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5" and "HIP_VISIBLE_DEVICES" not in env


def test_explicit_mask_wins_and_too_few_devices_is_an_error():
    env = slurm_task.task_env({"SLURM_NODEID": "0"}, _args(extra=["--mask", "2,3"]))
    assert env["HIP_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(SystemExit, match="fewer devices"):
        slurm_task.task_env({"SLURM_NODEID": "0"}, _args(extra=["--mask", "3"]))
    with pytest.raises(SystemExit, match="SLURM_NODEID"):
        slurm_task.task_env({}, _args())


def test_wrapper_execs_the_command_with_the_node_environment():
    code = "import os; print(os.environ['NODE_RANK'], os.environ['NNODES'], os.environ['MASTER_ADDR'], os.getpid())"
    env = dict(os.environ, SLURM_NODEID="1", SLURM_NNODES="2", SLURMD_NODENAME="n2", SLURM_JOB_ID="8",
               SLURM_STEP_ID="2")
    p = subprocess.Popen([sys.executable, *task_argv([sys.executable, "-c", code], master_addr="n1", master_port=20003,
                                                     nproc_per_node=1, mask_var="CUDA_VISIBLE_DEVICES")[1:]],
                         env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    rank, nnodes, master, pid = out.split()
    assert (rank, nnodes, master, int(pid)) == ("1", "2", "n1", p.pid)  # exec: same process, no extra layer
    banner = parse_banner(err.strip().splitlines()[0])
    assert banner["node"] == "n2" and banner["step"] == "8.2" and banner["CUDA_VISIBLE_DEVICES"] == "0"


# --------------------------------------------------------------------------- cancel (argv only)


def test_cancel_and_find_step_call_scancel_and_squeue(tmp_path):
    log = tmp_path / "calls"
    env = fake_command(tmp_path, "scancel", f'echo scancel "$@" >> {log}\n')
    env.update(fake_command(tmp_path, "squeue", f'echo squeue "$@" >> {log}\nprintf "12.0|other\\n12.3|dsplan-a2\\n"'))
    assert find_step("12", "dsplan-a2", env=env) == "12.3"
    assert find_step("12", "dsplan-a9", env=env) is None
    assert cancel_step("12", 3, env=env) and cancel_step("12", "12.3", signal_name="KILL", env=env)
    calls = log.read_text().splitlines()
    assert "scancel --quiet 12.3" in calls and "scancel --quiet --signal=KILL 12.3" in calls
    assert calls[0] == "squeue -h --steps --jobs=12 -o %i|%j"


# --------------------------------------------------------------------------- sbatch script


def _sbatch_lines(text: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]


def _bash_n(text: str, tmp_path: Path) -> None:
    script = tmp_path / SBATCH_NAME
    script.write_text(text)
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sbatch_asks_for_whole_nodes_from_the_profile(tmp_path):
    profile = make_profile("2x8x64G", backend="dcu", gpu_name="K100", host_ram="512G", cpu_cores=64)
    cmd = ["/opt/venv/bin/python", "-m", "dsplan", "run", "my cfg.yaml", "--run-dir", "/scratch/run $1"]
    text = render_sbatch(profile, cmd, SbatchOptions(partition="kshdexclu", time="2-00:00:00", account="proj"))
    _bash_n(text, tmp_path)
    opts = _sbatch_lines(text)
    for want in ("--nodes=2", "--ntasks-per-node=1", "--gres=dcu:8", "--cpus-per-task=64", "--exclusive",
                 "--mem=0", "--partition=kshdexclu", "--time=2-00:00:00", "--account=proj"):
        assert want in opts
    exec_line = [line for line in text.splitlines() if line.startswith("exec ")]
    assert len(exec_line) == 1 and shlex.split(exec_line[0])[1:] == cmd
    assert text.startswith("#!/bin/bash\n")


def test_sbatch_gres_by_backend_and_site_override(tmp_path):
    cmd = ["dsplan", "run", "x.yaml"]
    assert "--gres=gpu:4" in _sbatch_lines(render_sbatch(make_profile("4x80G"), cmd))
    assert "--gres=gpu:8" in _sbatch_lines(render_sbatch(make_profile("8x64G", backend="rocm"), cmd))
    dcu = make_profile("8x64G", backend="dcu")
    assert "--gres=gpu:8" in _sbatch_lines(render_sbatch(dcu, cmd, site={"gres": "gpu"}))
    assert "--gres=gpu:k100:8" in _sbatch_lines(render_sbatch(dcu, cmd, site={"gres": "gpu:k100"}))
    assert not any(o.startswith("--gres") for o in _sbatch_lines(render_sbatch(dcu, cmd, site={"gres": False})))
    lines = _sbatch_lines(render_sbatch(dcu, cmd, site={"mem": "480G", "exclusive": False}))
    assert "--mem=480G" in lines and "--exclusive" not in lines


def test_sbatch_site_lines_are_quoted_setup_lines_verbatim(tmp_path):
    site = {"modules": ["compiler/dtk/24.04"], "env": {"ROCM_PATH": "/opt/dtk", "NOTE": "a b; rm -rf /"},
            "setup": ["source /opt/dtk/env.sh"], "sbatch": ["--qos=normal"]}
    text = render_sbatch(make_profile("2x8x64G", backend="dcu"), ["dsplan", "run"], site=site)
    _bash_n(text, tmp_path)
    body = text.splitlines()
    assert "module load compiler/dtk/24.04" in body and "source /opt/dtk/env.sh" in body
    assert "export ROCM_PATH=/opt/dtk" in body and "export NOTE='a b; rm -rf /'" in body
    assert "--qos=normal" in _sbatch_lines(text)
    assert body.index("source /opt/dtk/env.sh") < body.index("exec dsplan run")


def test_sbatch_values_are_quoted_and_checked():
    profile = make_profile("2x8x80G")
    text = render_sbatch(profile, ["dsplan", "run"], SbatchOptions(job_name="my job", partition="a;b"))
    assert "--job-name='my job'" in _sbatch_lines(text) and "--partition='a;b'" in _sbatch_lines(text)
    with pytest.raises(UserError, match="--time"):
        render_sbatch(profile, ["dsplan"], SbatchOptions(time="tomorrow"))
    with pytest.raises(UserError, match="one line"):
        render_sbatch(profile, ["dsplan"], SbatchOptions(partition="p\n#SBATCH --exclusive"))
    with pytest.raises(UserError, match="one line"):
        render_sbatch(profile, ["dsplan", "x\ny"])


@pytest.mark.parametrize("site, match", [
    ({"modulez": ["x"]}, "unknown key"), ({"modules": "x"}, "list of strings"), ({"env": {"1X": "y"}}, "slurm.env"),
    ({"gres": "gpu dcu"}, "slurm.gres"), ({"mem": "lots"}, "slurm.mem"), ({"sbatch": ["qos=x"]}, "slurm.sbatch"),
    ({"setup": ["a\nb"]}, "one line"),
])
def test_bad_site_blocks_are_user_errors(site, match):
    with pytest.raises(UserError, match=match):
        check_site(site)


@pytest.mark.parametrize("value", ["90", "30:00", "12:00:00", "1-0", "2-12:30", "7-00:00:00"])
def test_slurm_time_forms_are_accepted(value):
    assert f"--time={value}" in _sbatch_lines(render_sbatch(make_profile("8x80G"), ["x"], SbatchOptions(time=value)))


def test_missing_slurm_fails_naming_the_packages(tmp_path):
    """The cluster fixture never skips: without the packages it fails and says what to install."""
    with pytest.raises(pytest.fail.Exception) as e:
        require_slurm(path=str(tmp_path))
    for package in ("slurmctld", "slurmd", "slurm-client", "munge", "iproute2", "util-linux"):
        assert package in str(e.value)
    assert "scripts/setup_slurm.sh" in str(e.value)


# --------------------------------------------------------------------------- dsplan run inside an allocation


def _opts(**kw):
    from dsplan.launch.loop import RunOptions

    return RunOptions(run_dir=Path("/tmp/unused"), lf_cli="/opt/lf/bin/llamafactory-cli", **kw)


def test_outside_an_allocation_or_with_the_per_node_flags_attempts_run_here(tmp_path):
    from dsplan.launch.placement import detect_placement

    profile = make_profile("2x8x64G", backend="rocm")
    here = detect_placement(profile, _opts(), {"PATH": "/usr/bin"})
    assert here.alloc is None and not here.labelled and here.before_kill(1) is None
    assert here.argv("lf", "a.yaml", 1) == ["lf", "train", "a.yaml"]
    by_hand = detect_placement(profile, _opts(nnodes=2, node_rank=1, master_addr="gpu07"), JOB_ENV)
    assert by_hand.alloc is None  # one node of a job started by hand, as before


def test_inside_an_allocation_each_attempt_is_one_srun_step_over_every_node(tmp_path):
    from dsplan.launch.placement import detect_placement

    env = dict(JOB_ENV, **fake_command(tmp_path, "scontrol", 'printf "gpu07\\ngpu08\\n"'))
    profile = make_profile("2x8x64G", backend="rocm")
    placement = detect_placement(profile, _opts(), env)
    assert placement.labelled and placement.nodes == ["gpu07", "gpu08"]
    argv = placement.argv("/opt/lf/bin/llamafactory-cli", "/run/attempt-003/lf_zero3.yaml", 3)
    assert argv[:10] == ["srun", "--jobid=4711", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                         "--kill-on-bad-exit=1", "--export=ALL", "--mem=0", "--job-name=dsplan-a3",
                         "--cpus-per-task=64"]
    wrapper = argv[argv.index("-m") + 1:]
    args = slurm_task.parse_args(wrapper[1:])
    assert (args.master_addr, args.master_port, args.nproc_per_node, args.mask_var, args.mask) == \
        ("gpu07", master_port("4711", 3), 8, "HIP_VISIBLE_DEVICES", None)
    assert args.command == ["/opt/lf/bin/llamafactory-cli", "train", "/run/attempt-003/lf_zero3.yaml"]
    opts = placement.node_options(_opts())
    assert (opts.nnodes, opts.master_addr, opts.node_rank) == (2, "gpu07", None)
    assert placement.started_fields() == {"nodes": ["gpu07", "gpu08"], "slurm_job": "4711"}


def test_an_allocation_of_another_size_than_the_plan_is_a_user_error(tmp_path):
    from dsplan.launch.placement import detect_placement

    env = dict(JOB_ENV, **fake_command(tmp_path, "scontrol", 'printf "gpu07\\ngpu08\\n"'))
    with pytest.raises(UserError, match=r"has 2 node\(s\).*plan is for 1 .*--nodes=1"):
        detect_placement(make_profile("8x64G"), _opts(), env)


def test_the_ledger_names_the_node_and_rank_the_evidence_came_from(tmp_path):
    from dsplan.launch.attempt import AttemptOutcome
    from dsplan.launch.placement import Placement
    from dsplan.launch.slurm import StepEnd
    from dsplan.logs.classifier import Finding

    alloc = Allocation("4711", "gpu[07-08]", 2, _hosts=["gpu07", "gpu08"])
    outcome = AttemptOutcome(exit_code=-15, finding=Finding("gpu_oom", "x", "rocm", "r"), started="", ended="",
                             killed=True, evidence_task=1, evidence_rank=11,
                             before_kill_result=StepEnd("4711.2", 0.4567, True))
    fields = Placement(make_profile("2x8x64G"), alloc).end_fields(outcome)
    assert fields == {"nodes": ["gpu07", "gpu08"], "slurm_job": "4711", "evidence_rank": 11,
                      "evidence_node": "gpu08", "slurm_step": "4711.2", "step_end_seconds": 0.457}
    assert Placement(make_profile("8x64G")).end_fields(outcome) == {"evidence_rank": 11}


# A step's output as srun --label gives it: node 0 keeps logging while node 1's rank 3 dies.
LABELLED_CHILD = r"""
import os, sys, time
out = lambda s: (print(s, flush=True))
err = lambda s: (print(s, file=sys.stderr, flush=True))
out("0: [INFO|2025-06-02 14:04:05] llamafactory.hparams.parser:406 >> Process rank: 0, world size: 4")
out(" 1: [INFO|2025-06-02 14:04:05] llamafactory.hparams.parser:406 >> Process rank: 3, world size: 4")
err("1: [rank3]: Traceback (most recent call last):")
err("0: [rank0]:   some unrelated warning")
err('1: [rank3]:   File "/x/torch/nn/modules/linear.py", line 125, in forward')
err("1: [rank3]: torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total "
    "capacity of 63.98 GiB of which 1.10 GiB is free.")
time.sleep(600)
"""


def test_labelled_output_finds_the_oom_task_and_ends_the_remote_part_first(tmp_path):
    """The srun labels are cut off before the classifier reads a line (its rules are anchored at
    the line start), the outcome names task 1 and rank 3, and before_kill gets the command's pid
    while it is still alive, before the process tree is signalled."""
    from dsplan.launch.attempt import run_attempt
    from dsplan.launch.proctree import running
    from dsplan.logs.classifier import Classifier

    seen = []
    out = run_attempt([sys.executable, "-c", LABELLED_CHILD], dict(os.environ), tmp_path, tmp_path / "a.log", None,
                      Classifier(), grace=0.5, echo=False, labelled=True,
                      before_kill=lambda pid: seen.append((pid, bool(running([pid])))) or "ended")
    assert out.finding.verdict == "gpu_oom" and out.kill_reason == "oom"
    assert out.finding.evidence.startswith("torch.OutOfMemoryError: HIP out of memory")
    assert (out.evidence_task, out.evidence_rank) == (1, 3)
    assert seen == [(out.command_pid, True)] and out.before_kill_result == "ended"


def test_a_sigterm_dsplan_did_not_send_is_an_interruption(tmp_path):
    """scancel and a job's time limit SIGTERM srun together with dsplan; srun may end first."""
    from dsplan.launch.attempt import run_attempt
    from dsplan.logs.classifier import Classifier

    code = "import os, signal; print('step 1', flush=True); os.kill(os.getpid(), signal.SIGTERM)"
    out = run_attempt([sys.executable, "-c", code], dict(os.environ), tmp_path, tmp_path / "a.log", None,
                      Classifier(), echo=False)
    assert out.kill_reason == "exited" and out.exit_code == -15
    assert out.finding.verdict == "interrupted" and "did not send" in out.finding.evidence
    code = "import sys; print('step 1', flush=True); sys.exit(143)"  # srun's way of saying its tasks got SIGTERM
    out = run_attempt([sys.executable, "-c", code], dict(os.environ), tmp_path, tmp_path / "b.log", None,
                      Classifier(), echo=False)
    assert out.finding.verdict == "interrupted"


def test_dry_run_inside_an_allocation_shows_the_step(tmp_path):
    from tests.conftest import run_dsplan

    env = dict(JOB_ENV, **fake_command(tmp_path, "scontrol", 'printf "gpu07\\ngpu08\\n"'))
    args = ["run", "--gpus", "2x8x64G", "--backend", "rocm", "--model", "Qwen2.5-7B", "--dry-run", "--run-dir",
            str(tmp_path / "run"), "--lf-cli", "/opt/lf/bin/llamafactory-cli"]
    r = run_dsplan(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert "Slurm job 4711: each attempt is one srun step over 2 node(s) (gpu07, gpu08)" in r.stdout
    assert "command: srun --jobid=4711" in r.stdout and "--job-name=dsplan-a1" in r.stdout
    assert "NNODES=2" in r.stdout and "MASTER_ADDR=gpu07" in r.stdout
    r = run_dsplan(*[a if a != "2x8x64G" else "8x64G" for a in args], env=env)
    assert r.returncode == 2 and "plan is for 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_render_slurm_writes_a_script_that_runs_the_same_inputs(tmp_path):
    from tests.conftest import run_dsplan

    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", "2x8x64G", "--backend", "dcu", "--gpu-name", "K100", "--model", "Qwen2.5-7B",
                   "--method", "full", "--cutoff-len", "1024", "--slurm", "--partition", "p1", "--time", "02:00:00",
                   "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = (out / SBATCH_NAME).read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gres=dcu:8" in text and "#SBATCH --partition=p1" in text
    run_line = next(line for line in text.splitlines() if " -m dsplan run " in line)
    for piece in ("--gpus 2x8x64G", "--backend dcu", "--method full", "--cutoff-len 1024",
                  f"--run-dir {(out / 'run').resolve()}"):
        assert piece in run_line, piece
    assert "--slurm" not in run_line and "--partition" not in run_line
    assert subprocess.run(["bash", "-n", str(out / SBATCH_NAME)]).returncode == 0
    r = run_dsplan("render", "--gpus", "1x24G", "--model", "Qwen2.5-7B", "--partition", "p1", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "go with --slurm" in r.stderr and not (tmp_path / "x").exists()
