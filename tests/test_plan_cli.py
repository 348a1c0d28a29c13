"""`dsplan plan`: the table, the stable --json object, and no heavy imports."""

import json
import subprocess
import sys

import pytest
import yaml

from dsplan.plan.tiers import TIER_NAMES
from tests.conftest import run_dsplan

SEED_003 = ["--gpus", "8x64G", "--backend", "rocm", "--gpu-name", "K100", "--host-ram", "512G",
            "--model", "DeepSeek-R1-Distill-Qwen-32B", "--method", "lora", "--cutoff-len", "1024"]


def test_plan_json_schema():
    r = run_dsplan("plan", *SEED_003, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["choice"] in ("zero3", "zero3_offload") and d["choice"] == d["ladder"][0]
    assert [t["tier"] for t in d["tiers"]] == list(TIER_NAMES)  # every tier, dropped ones too
    assert d["warnings"] == [] and d["workload"]["stage"] == "sft"  # a plain LoRA SFT: nothing unmodelled
    for t in d["tiers"]:
        for key in ("tier", "fits", "gpu_bytes", "host_bytes", "micro_batch", "grad_accum", "breakdown"):
            assert key in t, key
        assert t["refused_by_lf"] is None
        assert t["gpu_bytes"] == sum(t["breakdown"].values())
        assert "overhead" in t["breakdown"] and t["breakdown"]["overhead"] > 0
        assert isinstance(t["gpu_bytes"], int) and isinstance(t["fits"], bool)
    assert not d["tiers"][0]["fits"]  # zero2 cannot hold 32B of 16-bit weights on 64 GB


def test_plan_table_and_why():
    r = run_dsplan("plan", *SEED_003)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for word in ("tier", "fits", "GPU GiB", "host GiB", "micro-batch x GA", "speed rank", "breakdown", "why"):
        assert word in out
    for name in TIER_NAMES:
        assert name in out
    assert "zero2 does not fit" in out


def test_plan_holds_yaml_knobs_fixed(tmp_path):
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"model_name_or_path": "Qwen2.5-7B", "finetuning_type": "lora", "lora_rank": 64,
                                    "cutoff_len": 512, "per_device_train_batch_size": 2,
                                    "gradient_accumulation_steps": 4, "disable_gradient_checkpointing": True,
                                    "fp16": True}))
    r = run_dsplan("plan", str(user), "--gpus", "8x80G", "--json")
    d = json.loads(r.stdout)
    w = d["workload"]
    assert (w["cutoff_len"], w["micro_batch"], w["lora_rank"], w["gradient_checkpointing"]) == (512, 2, 64, False)
    assert d["tiers"][0]["micro_batch"] == 2 and d["tiers"][0]["grad_accum"] == 4
    # lora_target and optim from the YAML reach the estimate
    user.write_text(yaml.safe_dump({"model_name_or_path": "Qwen2.5-7B", "finetuning_type": "lora",
                                    "lora_target": "q_proj,v_proj", "optim": "paged_adamw_8bit"}))
    d = json.loads(run_dsplan("plan", str(user), "--gpus", "8x80G", "--json").stdout)
    assert d["workload"]["lora_targets"] == ["q_proj", "v_proj"] and d["workload"]["optim"] == "paged_adamw_8bit"
    assert "paged_optimizer" in d["tiers"][0]["host_breakdown"]
    # flags beat the YAML
    r = run_dsplan("plan", str(user), "--gpus", "8x80G", "--cutoff-len", "2048", "--json")
    assert json.loads(r.stdout)["workload"]["cutoff_len"] == 2048


def test_nothing_fits_exit_code_and_advice():
    r = run_dsplan("plan", "--gpus", "1x16G", "--host-ram", "16G", "--model", "Qwen2.5-72B", "--method", "lora")
    assert r.returncode == 4
    assert "nothing fits" in r.stdout and "--allow-qlora" in r.stdout


def test_plan_user_errors():
    r = run_dsplan("plan", "--gpus", "8x64G", "--model", "Qwen2.5-7B", "--tier", "zero9")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["plan", *SEED_003],
    ["plan", *SEED_003, "--json"],
    ["render", *SEED_003, "-o", "{tmp}/r"],
])
def test_no_torch_deepspeed_or_llamafactory_imported(tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = ("import sys, atexit\n"
            "def check():\n"
            "    bad = [m for m in ('torch', 'deepspeed', 'llamafactory', 'transformers') if m in sys.modules]\n"
            "    sys.stderr.write('HEAVY:' + ','.join(bad) + '\\n')\n"
            "atexit.register(check)\n"
            "from dsplan.cli import cli\n"
            f"cli.main({args!r}, prog_name='dsplan')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "HEAVY:\n" in r.stderr, r.stderr


def test_plan_reads_the_stage_and_its_knobs_from_the_yaml(tmp_path):
    user = tmp_path / "u.yaml"
    base = {"model_name_or_path": "Qwen2.5-7B", "do_train": True, "finetuning_type": "lora", "cutoff_len": 1024}
    user.write_text(yaml.safe_dump(base))
    sft = json.loads(run_dsplan("plan", str(user), "--gpus", "8x80G", "--json").stdout)
    user.write_text(yaml.safe_dump({**base, "stage": "dpo", "pref_loss": "sigmoid"}))
    dpo = json.loads(run_dsplan("plan", str(user), "--gpus", "8x80G", "--json").stdout)
    assert dpo["workload"]["stage"] == "dpo" and dpo["workload"]["pref_loss"] == "sigmoid"
    for a, b in zip(sft["tiers"], dpo["tiers"]):  # pairs and a reference forward: more on every tier
        assert b["gpu_bytes"] > a["gpu_bytes"] and "ref_forward" in b["breakdown"]
        assert "ref_model" not in b["breakdown"]  # LoRA: the reference is the base with adapters off
    user.write_text(yaml.safe_dump({**base, "use_unsloth": True}))
    r = run_dsplan("plan", str(user), "--gpus", "8x80G")
    assert r.returncode == 0 and "refused (LF)" in r.stdout
    assert "zero3 refused by LLaMA-Factory: Unsloth is incompatible with DeepSpeed ZeRO-3." in r.stdout
    assert "warning: use_unsloth" in r.stdout


def test_unknown_host_ram_names_what_the_ladder_needs_of_it():
    d = json.loads(run_dsplan("plan", "--gpus", "2x8x80G", "--model", "DeepSeek-V3", "--method", "full",
                              "--json").stdout)
    line = next(x for x in d["why"] if x.startswith("host RAM unknown"))
    most = max((t for t in d["tiers"] if t["tier"] in d["ladder"]), key=lambda t: t["host_bytes"])
    assert f"{most['tier']} needs {most['host_bytes'] / 1024**3:,.0f} GiB per node" in line
    known = json.loads(run_dsplan("plan", "--gpus", "2x8x80G", "--host-ram", "2T", "--model", "DeepSeek-V3",
                                  "--method", "full", "--json").stdout)
    assert not any(x.startswith("host RAM unknown") for x in known["why"])
