"""`dsplan run` and `dsplan demo` through the real llamafactory-cli and DeepSpeed on the CPU.

A tiny Qwen2-shaped model and dataset are made locally (dsplan.demo.assets).  The
out-of-memory is real: the demo runs llamafactory-cli under an address-space cap
(RLIMIT_AS), so micro-batch 64 fails inside torch's allocator.
"""

import json
from pathlib import Path

import pytest
import yaml

from dsplan.launch.ledger import read_attempts
from tests.conftest import run_dsplan

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def assets(tmp_path_factory, train_python):
    from dsplan.demo.assets import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("assets"))


def test_demo_real_oom_then_fallback_then_success(tmp_path, train_python):
    r = run_dsplan("demo", "--workdir", str(tmp_path / "demo"), timeout=1500,
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
        assert (d / f"lf_{a['tier']}.yaml").is_file() and (d / "train.log").stat().st_size > 0
        assert yaml.safe_load((d / f"lf_{a['tier']}.yaml").read_text())["per_device_train_batch_size"] == a[
            "micro_batch"]
    assert "DefaultCPUAllocator" in (dirs[0] / "train.log").read_text(errors="replace")
    steps = [json.loads(x) for x in (Path(last["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    logged = [s["current_steps"] for s in steps if "loss" in s]
    assert logged == list(range(1, steps[0]["total_steps"] + 1))  # every step, in order
    assert "attempt 1" in r.stdout and "success" in r.stdout


def test_real_two_process_run_succeeds(tmp_path, assets, train_python):
    model_dir, data_dir, dataset = assets
    user = tmp_path / "train.yaml"
    user.write_text(yaml.safe_dump({
        "model_name_or_path": str(model_dir), "finetuning_type": "lora", "dataset": dataset,
        "dataset_dir": str(data_dir), "template": "qwen", "cutoff_len": 128, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "max_steps": 2, "logging_steps": 1, "save_steps": 100000,
        "report_to": "none", "preprocessing_num_workers": 1, "dataloader_num_workers": 0}))
    r = run_dsplan("run", str(user), "--gpus", "2x16G", "--gpu-name", "T4", "--tier", "zero3",
                   "--run-dir", str(tmp_path / "run"), "--stall-timeout", "600", timeout=1200,
                   env={"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ledger = read_attempts(tmp_path / "run")
    assert [a["verdict"] for a in ledger] == ["success"] and ledger[0]["tier"] == "zero3"
    log = (tmp_path / "run" / "attempt-001" / "train.log").read_text(errors="replace")
    assert "world size: 2" in log  # two real ranks over gloo
    steps = [json.loads(x) for x in (Path(ledger[0]["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    assert [s["current_steps"] for s in steps if "loss" in s] == [1, 2]
