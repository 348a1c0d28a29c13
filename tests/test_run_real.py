"""`dsplan run` and `dsplan demo` through the real llamafactory-cli and DeepSpeed on the CPU.

A tiny Qwen2-shaped model and dataset are made locally (dsplan.demo.assets).  The
out-of-memory is real: the demo runs llamafactory-cli under an address-space cap
(RLIMIT_AS), so micro-batch 64 fails inside torch's allocator.

Every run here trains in fp32, the one precision DeepSpeed's CPU accelerator takes
on any x86-64 CPU (fp16 needs AVX512-FP16 or AMX).  Each test first asks the
training interpreter for what it needs and fails naming what is missing.
"""

import json
from pathlib import Path

import pytest
import yaml

from dsplan.launch.ledger import read_attempts
from tests.conftest import run_dsplan
from tests.fakes.cpu_caps import cpu_capabilities, require

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def caps(train_python):
    from dsplan.demo.demo import cpu_env

    return cpu_capabilities(train_python, cpu_env(train_python))


@pytest.fixture(scope="module")
def assets(tmp_path_factory, train_python):
    from dsplan.demo.assets import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("assets"))


def log_digest(text: str, tail: int = 3000) -> str:
    """A failure message from a training log: its error-looking lines, then its tail."""
    marks = ("error", "abort", "terminate", "what()", "killed", "signal")
    hits = [line for line in text.splitlines() if any(m in line.lower() for m in marks)][:40]
    return "\n".join(hits) + "\n---- tail ----\n" + text[-tail:]


def rendered_yaml(attempt_dir: Path, tier: str) -> dict:
    return yaml.safe_load((attempt_dir / f"lf_{tier}.yaml").read_text())


def test_demo_real_oom_then_fallback_then_success(tmp_path, train_python, caps):
    require(caps, precision="fp32", rlimit_as=True)
    r = run_dsplan("demo", "--micro-batch", "--workdir", str(tmp_path / "demo"), timeout=1500,
                   env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "demo" / "run"
    ledger = read_attempts(run_dir)
    assert len(ledger) >= 2
    first, last = ledger[0], ledger[-1]
    assert first["verdict"] == "host_oom" and "can't allocate memory" in first["evidence"]
    assert first["exit_code"] != 0  # dsplan ended it on the OOM line (SIGTERM), or it exited 1 first
    assert last["verdict"] == "success" and last["exit_code"] == 0
    assert last["micro_batch"] < first["micro_batch"]
    assert last["micro_batch"] * last["grad_accum"] == first["micro_batch"] * first["grad_accum"]
    # every attempt has its own folder, configs, log and output_dir
    dirs = [run_dir / f"attempt-{a['attempt']:03d}" for a in ledger]
    assert len({a["output_dir"] for a in ledger}) == len(ledger)
    for d, a in zip(dirs, ledger):
        lf = rendered_yaml(d, a["tier"])
        assert lf["per_device_train_batch_size"] == a["micro_batch"] and (d / "train.log").stat().st_size > 0
        assert not lf.get("fp16") and not lf.get("bf16"), "the demo must train in fp32 on any CPU"
    assert "DefaultCPUAllocator" in (dirs[0] / "train.log").read_text(errors="replace")
    steps = [json.loads(x) for x in (Path(last["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    logged = [s["current_steps"] for s in steps if "loss" in s]
    assert logged == list(range(1, steps[0]["total_steps"] + 1))  # every step, in order
    assert "attempt 1" in r.stdout and "success" in r.stdout
    # each attempt measured itself: estimate and host peak filled, the GPU figures null on a CPU
    for a in ledger:
        assert a["estimate"]["gpu_bytes"] > 0 and a["measured"]["host_peak_bytes"] > 2**30
        assert a["measured"]["vram_allocated_bytes"] is None and a["measured"]["vram_reserved_bytes"] is None
    assert first["oom_figures"]["tried"] > 0 and last["oom_figures"] is None


def test_real_two_process_run_succeeds(tmp_path, assets, train_python, caps):
    """Two real ranks over gloo at zero3, through dsplan's run loop with the demo's CPU
    plan (fp32).  `dsplan run` itself has no way to ask for fp32 yet: the plan comes
    from the same code the demo uses, and the loop is the one `dsplan run` calls."""
    from dsplan.demo.demo import cpu_env, cpu_plan
    from dsplan.launch.loop import RunOptions, resolve_lf_cli, run

    require(caps, precision="fp32", gloo=True)
    model_dir, data_dir, dataset = assets
    user = {
        "model_name_or_path": str(model_dir), "finetuning_type": "lora", "dataset": dataset,
        "dataset_dir": str(data_dir), "template": "qwen", "cutoff_len": 128, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "max_steps": 2, "logging_steps": 1, "save_steps": 100000,
        "report_to": "none", "preprocessing_num_workers": 1, "dataloader_num_workers": 0}
    lf_cli = resolve_lf_cli(None)
    said: list[str] = []
    opts = RunOptions(run_dir=tmp_path / "run", lf_cli=lf_cli, start_tier="zero3", max_attempts=1,
                      fallback=False, stall_timeout=600, echo=False, env=cpu_env(lf_cli))
    code = run(cpu_plan(user, model_dir, 2), user, opts, say=said.append)
    log = (tmp_path / "run" / "attempt-001" / "train.log").read_text(errors="replace")
    assert code == 0, "\n".join(said) + "\n" + log_digest(log)
    ledger = read_attempts(tmp_path / "run")
    assert [a["verdict"] for a in ledger] == ["success"] and ledger[0]["tier"] == "zero3"
    lf = rendered_yaml(tmp_path / "run" / "attempt-001", "zero3")
    assert not lf.get("fp16") and not lf.get("bf16")
    assert "world size: 2" in log  # two real ranks over gloo
    steps = [json.loads(x) for x in (Path(ledger[0]["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    assert [s["current_steps"] for s in steps if "loss" in s] == [1, 2]


@pytest.mark.parametrize("optim_torch, reaches", [(None, "expandable_segments:True"), ("0", "max_split_size_mb:64")])
def test_lfs_launcher_replaces_the_allocator_setting_unless_optim_torch_is_off(tmp_path, train_python, optim_torch,
                                                                               reaches):
    """The fact behind `run`'s note: LF's own launcher, given a user's PYTORCH_CUDA_ALLOC_CONF, starts
    torchrun (a fake one here, that prints what it got) with expandable_segments:True instead."""
    import os
    import subprocess

    from dsplan.launch.node_env import allocator_notes

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/sh\necho "torchrun got PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FORCE_TORCHRUN": "1",
           "NPROC_PER_NODE": "1", "MASTER_PORT": "29599", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    if optim_torch is not None:
        env["OPTIM_TORCH"] = optim_torch
    cli = Path(train_python).parent / "llamafactory-cli"
    out = subprocess.run([str(cli), "train", str(tmp_path / "unused.yaml")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert f"torchrun got PYTORCH_CUDA_ALLOC_CONF={reaches}" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert bool(allocator_notes(env)) == (reaches != "max_split_size_mb:64")  # dsplan's note says exactly this
