"""A real fall back across a ZeRO stage that continues from the checkpoint's weights, not from step 0.

The real llamafactory-cli and DeepSpeed train dsplan's tiny demo model on the CPU in
fp32 (LoRA, one process).  At zero2 it saves checkpoint-2, then, after step 3, a
host out-of-memory is forced (tests/fakes/children/fake_lf_oom_after_save.py stops
the training and prints the traceback torch's CPU allocator gives).  dsplan falls
back to zero3, whose optimizer cannot load zero2's shards; the attempt takes the
saved adapter, and the Trainer's step count, schedule and data position, with a
fresh optimizer.
"""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from dsplan.launch.ledger import read_attempts
from tests.conftest import REPO

pytestmark = pytest.mark.real

FAKE = REPO / "tests" / "fakes" / "children" / "fake_lf_oom_after_save.py"


def fp32_plan(user: dict, model_dir: Path, gpus: str):
    """The plan for a CPU run: pretend cards with no name, fp32 (DeepSpeed's CPU accelerator
    takes it on any x86-64 CPU; fp16 needs AVX512-FP16 or AMX)."""
    from dsplan.inputs.hardware import make_profile
    from dsplan.inputs.model import load_model_spec
    from dsplan.inputs.settings import merge_settings
    from dsplan.plan.planner import make_plan

    settings = merge_settings(user, model_name_or_path=str(model_dir), default_template="qwen",
                              precision_supported="fp32", flags={"flash_attn": "sdpa"})
    return make_plan(make_profile(gpus, "cuda"), load_model_spec(str(model_dir)), settings)


def cpu_env(lf_cli: str, extra: dict) -> dict:
    """Offline, no GPU, the llamafactory-cli's folder first on PATH (LF starts a bare torchrun)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", **extra)
    env["PATH"] = str(Path(lf_cli).parent) + os.pathsep + env.get("PATH", "")
    env.pop("HIP_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def assets(tmp_path_factory, train_python):
    from dsplan.demo.assets import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("assets"))


def logged(output_dir: Path) -> dict[int, dict]:
    """trainer_log.jsonl's training records by step."""
    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    return {rec["current_steps"]: rec for rec in map(json.loads, lines) if "loss" in rec}


def test_lora_continues_from_the_adapter_after_a_fall_back_to_another_zero_stage(tmp_path, assets, train_python):
    from dsplan.launch.loop import RunOptions, resolve_lf_cli, run

    real_cli = resolve_lf_cli(None)
    model_dir, data_dir, dataset = assets
    user = {"model_name_or_path": str(model_dir), "finetuning_type": "lora", "dataset": dataset,
            "dataset_dir": str(data_dir), "template": "qwen", "cutoff_len": 128, "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1, "max_steps": 5, "logging_steps": 1, "save_steps": 2,
            "report_to": "none", "preprocessing_num_workers": 1, "dataloader_num_workers": 0}
    # On this tiny model every tier needs about the same memory, so the planner's ladder is
    # zero2 alone; widen it so that a host OOM at zero2 falls back across a ZeRO stage.
    plan = replace(fp32_plan(user, model_dir, "1x16G"), ladder=["zero2", "zero3"])
    wrapper = tmp_path / "bin" / "llamafactory-cli"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    wrapper.chmod(0o755)
    said: list[str] = []
    env = cpu_env(real_cli, {"FAKE_REAL_LF_CLI": real_cli, "FAKE_OOM_AFTER_SAVE_TIERS": "zero2",
                             "FAKE_OOM_AT_STEP": "3"})
    opts = RunOptions(run_dir=tmp_path / "run", lf_cli=str(wrapper), start_tier="zero2", max_attempts=2,
                      stall_timeout=900, echo=False, env=env)
    code = run(plan, user, opts, say=said.append)
    logs = {p.parent.name: p.read_text(errors="replace") for p in (tmp_path / "run").glob("attempt-*/train.log")}
    assert code == 0, "\n".join(said) + "\n" + "\n".join(t[-3000:] for t in logs.values())

    first, second = read_attempts(tmp_path / "run")
    assert (first["tier"], first["verdict"], second["tier"], second["verdict"]) == \
        ("zero2", "host_oom", "zero3", "success")
    resumed = second["resumed_from"]
    ck = Path(resumed["checkpoint"])
    assert resumed["mode"] == "weights" and ck.parent == Path(first["output_dir"])
    assert resumed["step"] == int(ck.name.split("-")[1]) >= 2 and resumed["from_tier"] == "zero2"
    assert "optimizer's moments" in resumed["lost"]
    # the rendered YAML took the adapter; the base model stays
    lf = yaml.safe_load((tmp_path / "run" / "attempt-002" / "lf_zero3.yaml").read_text())
    assert lf["adapter_name_or_path"] == str(ck) and lf["resume_from_checkpoint"] == str(ck)
    assert lf["model_name_or_path"] == str(model_dir) and not lf.get("fp16") and not lf.get("bf16")
    assert (ck / "adapter_model.safetensors").is_file()
    # attempt 2 trains on from the checkpoint's step: its log starts after it, not at 0
    before, after = logged(Path(first["output_dir"])), logged(Path(second["output_dir"]))
    assert list(after) == list(range(resumed["step"] + 1, 6)), after
    assert list(before)[:3] == [1, 2, 3]
    # the step after the checkpoint again: the schedule goes on where it was (no new warm-up), and
    # the same weights on the same batch (the data position was restored) give the same loss
    step = resumed["step"] + 1
    assert after[step]["lr"] == pytest.approx(before[step]["lr"]) and after[step]["lr"] > 0
    assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-3)
    log2 = logs["attempt-002"]
    assert f"[dsplan] continuing from {ck}" in log2 and "optimizer starts fresh" in log2
    assert "Loaded adapter(s): " + str(ck) in log2
