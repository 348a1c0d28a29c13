"""Rendering: structure of the DeepSpeed JSON and LF YAML, safe values, the user's own YAML."""

import json

import pytest
import yaml

from dataclasses import fields

from dsplan.emit.render import render_deepspeed
from dsplan.errors import UserError
from dsplan.inputs.hardware import make_profile
from dsplan.inputs.model import load_model_spec
from dsplan.inputs.settings import TrainSettings
from dsplan.plan.planner import make_plan
from dsplan.plan.tiers import TIERS, get_tier
from dsplan.schema.ds import Bf16, DsConfig, Fp16, Offload, ZeroOptimization
from tests.conftest import run_dsplan

HF_AUTO_KEYS = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"]


def render(tmp_path, *extra, out="out"):
    r = run_dsplan("render", "--gpus", "8x64G", "--backend", "rocm", *extra, "-o", str(tmp_path / out))
    assert r.returncode == 0, r.stderr
    return tmp_path / out, r


def test_four_tiers_rendered_with_hf_auto_values(tmp_path, model_dir):
    out, r = render(tmp_path, "--model", str(model_dir))
    for tier in TIERS:
        ds = json.loads((out / f"ds_{tier.name}.json").read_text())
        for key in HF_AUTO_KEYS:
            assert ds[key] == "auto"
        assert ds["fp16"]["enabled"] == "auto" and ds["bf16"]["enabled"] == "auto"
        assert "optimizer" not in ds
        zero = ds["zero_optimization"]
        assert zero["stage"] == tier.stage and zero["reduce_bucket_size"] == "auto"
        assert ("offload_optimizer" in zero) is tier.offload_optimizer
        assert ("offload_param" in zero) is tier.offload_param
        for block in ("offload_optimizer", "offload_param"):
            if block in zero:
                assert zero[block] == {"device": "cpu", "pin_memory": True}
        if tier.stage == 3:
            assert zero["stage3_prefetch_bucket_size"] == "auto"
            assert zero["stage3_param_persistence_threshold"] == "auto"
        lf = yaml.safe_load((out / f"lf_{tier.name}.yaml").read_text())
        assert lf["deepspeed"] == str(out / f"ds_{tier.name}.json")
        assert lf["bf16"] is True and "fp16" not in lf
        assert lf["report_to"] == "none" and lf["finetuning_type"] == "lora"
        assert lf["model_name_or_path"] == str(model_dir) and lf["template"] == "qwen"
    manifest = json.loads((out / "dsplan.json").read_text())
    assert manifest["hardware"]["world_size"] == 8 and [t["tier"] for t in manifest["tiers"]] == [
        t.name for t in TIERS]
    assert str(out) in r.stdout


def test_precision_follows_hardware(tmp_path):
    out, _ = render(tmp_path, "--model", "Llama-3-8B", "--tier", "zero3", out="v100")
    lf = yaml.safe_load((out / "lf_zero3.yaml").read_text())
    assert lf["bf16"] is True
    r = run_dsplan("render", "--gpus", "8x32G", "--gpu-name", "V100", "--model", "Llama-3-8B", "--tier", "zero3",
                   "-o", str(tmp_path / "fp16"))
    assert r.returncode == 0, r.stderr
    lf = yaml.safe_load((tmp_path / "fp16" / "lf_zero3.yaml").read_text())
    assert lf["fp16"] is True and "bf16" not in lf
    assert lf["model_name_or_path"] == "meta-llama/Meta-Llama-3-8B"


@pytest.mark.parametrize("alias,tier", [("minimal", "zero3_offload"), ("deepspeed", "zero2"),
                                        ("stage2_offload", "zero2_offload"), ("stage3", "zero3")])
def test_tier_aliases(tmp_path, alias, tier, model_dir):
    assert get_tier(alias).name == tier
    out, _ = render(tmp_path, "--model", str(model_dir), "--tier", alias)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"ds_{tier}.json", f"lf_{tier}.yaml", "dsplan.json"])


def test_unknown_tier_is_user_error():
    with pytest.raises(UserError):
        get_tier("zero4")


NASTY = [
    "has 'single' and \"double\" quotes",
    "colon: inside, and # a hash",
    "line one\nline two\n",
    "  leading and trailing spaces  ",
    "yes", "null", "1e3", "@at", "- dash", "{brace}", "[bracket]", "%percent", "*star", "&amp", "!bang",
    "tab\there", "unicodé 中文", "",
]


@pytest.mark.parametrize("value", NASTY)
def test_values_round_trip(tmp_path, model_dir, value):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"dataset": value or "x", "output_dir": value or "x", "run_name": value,
                                    "dataset_dir": f"/data/{value}"}))
    out, _ = render(tmp_path, str(user), "--model", str(model_dir), "--tier", "zero2")
    lf = yaml.safe_load((out / "lf_zero2.yaml").read_text())
    assert lf["dataset"] == (value or "x")
    assert lf["output_dir"] == (value or "x") and lf["run_name"] == value and lf["dataset_dir"] == f"/data/{value}"


def test_dataset_flag_with_special_characters(tmp_path, model_dir):
    name = 'my "data": v2 # final'
    out, _ = render(tmp_path, "--model", str(model_dir), "--dataset", name, "--tier", "zero3")
    assert yaml.safe_load((out / "lf_zero3.yaml").read_text())["dataset"] == name


def test_user_yaml_keys_kept_and_managed_changes_reported(tmp_path, model_dir):
    user = tmp_path / "train.yaml"
    user.write_text(yaml.safe_dump({
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 16, "lora_alpha": 32, "dataset": "mydata", "template": "qwen", "cutoff_len": 1024,
        "learning_rate": 5.0e-5, "num_train_epochs": 2.0, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 16, "deepspeed": "examples/deepspeed/ds_z3_config.json",
        "fp16": True, "ddp_timeout": 180000000, "report_to": "tensorboard", "output_dir": "saves/mine",
        "save_steps": 100,
    }))
    out, r = render(tmp_path, str(user), "--tier", "zero3", "--cutoff-len", "512")
    lf = yaml.safe_load((out / "lf_zero3.yaml").read_text())
    for key in ("lora_rank", "lora_alpha", "dataset", "learning_rate", "num_train_epochs", "ddp_timeout",
                "report_to", "output_dir", "save_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps"):
        assert lf[key] == yaml.safe_load(user.read_text())[key], key
    assert lf["cutoff_len"] == 512 and lf["fp16"] is True
    assert lf["deepspeed"] == str(out / "ds_zero3.json")
    assert "deepspeed: 'examples/deepspeed/ds_z3_config.json' -> the tier's file" in r.stdout
    assert "cutoff_len: 1024 -> 512" in r.stdout


def test_bf16_user_yaml_on_fp16_hardware_is_changed(tmp_path, model_dir):
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"model_name_or_path": str(model_dir), "bf16": True, "dataset": "d"}))
    r = run_dsplan("render", str(user), "--gpus", "8x32G", "--gpu-name", "V100", "--tier", "zero2",
                   "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    lf = yaml.safe_load((tmp_path / "o" / "lf_zero2.yaml").read_text())
    assert lf["fp16"] is True and "bf16" not in lf
    assert "bf16: True -> removed" in r.stdout


def test_no_overwrite_without_force(tmp_path, model_dir):
    out, _ = render(tmp_path, "--model", str(model_dir), "--tier", "zero2")
    before = (out / "lf_zero2.yaml").read_text()
    r = run_dsplan("render", "--gpus", "1x24G", "--model", str(model_dir), "--tier", "zero2", "-o", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "lf_zero2.yaml").read_text() == before
    r = run_dsplan("render", "--gpus", "1x24G", "--model", str(model_dir), "--tier", "zero2", "-o", str(out),
                   "--force")
    assert r.returncode == 0 and (out / "lf_zero2.yaml").read_text() != before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_qlora_and_full(tmp_path, model_dir):
    out, _ = render(tmp_path, "--model", str(model_dir), "--method", "qlora", "--tier", "zero2", out="q")
    lf = yaml.safe_load((out / "lf_zero2.yaml").read_text())
    assert lf["finetuning_type"] == "lora" and lf["quantization_bit"] == 4 and lf["quantization_method"] == "bnb"
    out, _ = render(tmp_path, "--model", str(model_dir), "--method", "full", "--tier", "zero2", out="f")
    lf = yaml.safe_load((out / "lf_zero2.yaml").read_text())
    assert lf["finetuning_type"] == "full" and "lora_rank" not in lf and "quantization_bit" not in lf


def test_settings_derived_method_keys_keep_the_users_values(tmp_path, model_dir):
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"model_name_or_path": str(model_dir), "do_train": True, "stage": "kto",
                                    "finetuning_type": "lora", "quantization_bit": 4,
                                    "quantization_method": "hqq", "pref_beta": 0.2}))
    out, r = render(tmp_path, str(user), "--tier", "zero2")
    lf = yaml.safe_load((out / "lf_zero2.yaml").read_text())
    assert (lf["stage"], lf["quantization_bit"], lf["quantization_method"], lf["pref_beta"]) == ("kto", 4, "hqq", 0.2)
    assert "changed in your YAML" not in r.stdout
    manifest = json.loads((out / "dsplan.json").read_text())
    assert manifest["settings"]["stage"] == "kto" and manifest["plan"]["warnings"] == []


# ---------------------------------------------------------------- the DeepSpeed schema
def tier_configs(gpus, model, method, host_ram, micro_batch=1):
    settings = TrainSettings(model_name_or_path=model, method=method, cutoff_len=1024, micro_batch=micro_batch)
    plan = make_plan(make_profile(gpus, host_ram=host_ram), load_model_spec(model), settings)
    return [t.tier_config() for t in plan.tiers]


@pytest.mark.parametrize("gpus,model,method,host_ram,micro_batch", [
    ("8x24G", "Qwen2.5-32B", "full", "2048G", 4),  # small cards: 200M allgather bucket; lean ZeRO-3
    ("8x80G", "Llama-3-70B", "full", "1500G", 1),  # offloaded states too large to pin
    ("1x80G", "Qwen2.5-7B", "lora", None, 2),
])
def test_rendered_deepspeed_json_is_the_tier_config(gpus, model, method, host_ram, micro_batch):
    configs = tier_configs(gpus, model, method, host_ram, micro_batch)
    for tc in configs:
        data = json.loads(render_deepspeed(tc))
        assert data == tc.ds.to_dict()  # same keys, same values, same stage-specific keys
        assert list(data["zero_optimization"]) == list(tc.ds.zero_optimization.to_dict())  # and order
        assert DsConfig.from_dict(data) == tc.ds
    zeros = {tc.tier.name: tc.ds.zero_optimization for tc in configs}
    if gpus == "8x24G":
        assert zeros["zero2"].allgather_bucket_size == 200_000_000
        assert zeros["zero3_offload"].stage3_max_live_parameters < ZeroOptimization.stage3_max_live_parameters
    if host_ram == "1500G":
        assert zeros["zero3_offload"].offload_optimizer.pin_memory is False


def test_ds_schema_refuses_unknown_keys():
    with pytest.raises(ValueError, match="zero_optimization: unknown key.* stage3_max_live_paramters"):
        DsConfig.from_dict({"zero_optimization": {"stage": 3, "stage3_max_live_paramters": 1}})
    with pytest.raises(ValueError, match="offload.*pinned"):
        ZeroOptimization.from_dict({"stage": 2, "offload_optimizer": {"device": "cpu", "pinned": True}})
    with pytest.raises(ValueError, match="fp16: unknown key.* loss_scale_windw"):
        DsConfig.from_dict({"fp16": {"loss_scale_windw": 500}})
    with pytest.raises(ValueError, match="optimizer"):
        DsConfig.from_dict({"optimizer": {"type": "AdamW"}})
    assert ZeroOptimization.from_dict({"stage": 3}).offload_param is None


def test_every_schema_key_has_help():
    for block in (DsConfig, ZeroOptimization, Offload, Fp16, Bf16):
        assert all(text.strip() for text in block.help().values()), block


@pytest.mark.real
def test_deepspeed_accepts_the_schema_and_shares_its_defaults():
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig

    # Where dsplan's defaults differ from DeepSpeed's on purpose (each field's help says so).
    chosen = {"round_robin_gradients", "stage3_gather_16bit_weights_on_model_save", "device"}
    pairs = [(ZeroOptimization, DeepSpeedZeroConfig), (Offload, DeepSpeedZeroOffloadOptimizerConfig),
             (Fp16, DeepSpeedFP16Config), (Bf16, DeepSpeedBF16Config)]
    for ours, theirs in pairs:
        defaults = theirs().model_dump(by_alias=True)
        for f in fields(ours):
            assert f.name in defaults, f"{ours.__name__}.{f.name} is not a DeepSpeed key"
            if f.default != "auto" and f.name not in chosen:
                assert f.default == defaults[f.name], f"{ours.__name__}.{f.name}"
    for tc in tier_configs("8x24G", "Llama-3-8B", "full", "512G"):
        zero = json.loads(render_deepspeed(tc))["zero_optimization"]
        filled = {k: (1000 if v == "auto" else v) for k, v in zero.items()}  # HF's fill-in
        DeepSpeedZeroConfig(**filled)  # extra keys are refused by DeepSpeed too
