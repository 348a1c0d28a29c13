"""LLaMA-Factory's own example YAMLs through ``dsplan plan`` (torch-free).

The examples are LF's ``examples/train_lora``, ``train_full``, ``train_qlora`` and
``extras`` at two points of its history, copied into ``tests/data/lf_examples`` (see the
README there).  ``scripts/sweep_lf_examples.py`` plans each on one and eight 80 GB GPUs with
the models' config.json in a scratch HF cache or folder; these tests hold its outcomes.
LF's own checks on the rendered tiers are in ``test_lf_examples_real.py``.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import load_script


sweep = load_script("sweep_lf_examples")

#: Every example that does not plan, and why.  All the others are training configs that must plan.
NOT_PLANNED = {
    # not training configs: predict, `llamafactory-cli eval`, and a list of added tokens
    "main/extras/nlg_eval/llama3_lora_predict.yaml": "not-training",
    "v0.9.3/extras/nlg_eval/llama3_lora_predict.yaml": "not-training",
    "v0.9.3/train_lora/llama3_lora_eval.yaml": "not-training",
    "main/extras/multi_tokens/tokens_cfg.yaml": "not-training",
    # LF 0.9.5 refuses GaLore and APOLLO with DeepSpeed, at every tier
    "main/extras/galore/llama3_full_sft.yaml": "lf-refuses",
    "main/extras/apollo/llama3_full_sft.yaml": "lf-refuses",
    "v0.9.3/extras/galore/llama3_full_sft.yaml": "lf-refuses",
    "v0.9.3/extras/apollo/llama3_full_sft.yaml": "lf-refuses",
    # v0.9.3's Ray keys (ray_run_name, ray_storage_path, ...) are gone from LF 0.9.5's parser
    "v0.9.3/train_lora/llama3_lora_sft_ray.yaml": "unknown-key",
    # MOSS-VL: no public config.json found (models.json says so)
    "main/train_full/mossvl_full_sft.yaml": "no-config",
    "main/train_lora/mossvl_lora_sft.yaml": "no-config",
}


class _workspace:
    """A scratch workspace with models.json's configs in place; yields the environment for dsplan."""

    def __enter__(self):
        import tempfile
        from pathlib import Path

        self._tmp = tempfile.TemporaryDirectory(prefix="dsplan-lf-examples-test-")
        root = Path(self._tmp.name)
        env = sweep.build_workspace(root, sweep.load_models())
        self._cwd = sweep.working_folder(root / "work")
        self._cwd.__enter__()
        return env

    def __exit__(self, *exc):
        self._cwd.__exit__(*exc)
        self._tmp.cleanup()


@pytest.fixture(scope="module")
def rows():
    return sweep.sweep(sweep.DEFAULT_GPUS)


def test_the_examples_are_lf_s_four_folders_at_two_versions():
    files = [p.relative_to(sweep.EXAMPLES).as_posix() for p in sweep.example_files()]
    assert sum(f.startswith("main/") for f in files) == 42 and sum(f.startswith("v0.9.3/") for f in files) == 31
    assert {f.split("/")[1] for f in files} == {"train_lora", "train_full", "train_qlora", "extras"}
    readme = (sweep.EXAMPLES / "README.md").read_text(encoding="utf-8")
    assert "Apache" in readme and "v0.9.3" in readme and "ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30" in readme
    assert set(NOT_PLANNED) <= set(files)


def test_every_training_example_plans_with_a_choice(rows):
    """Exit 0 and a choice on one and eight GPUs, with no tier LF refuses chosen or on the ladder."""
    training = [r for r in rows if r.example not in NOT_PLANNED]
    bad = [f"{r.example} {r.gpus}: {r.outcome} (exit {r.code}) {r.message}" for r in training if r.outcome != "ok"]
    assert not bad, "\n".join(bad)
    assert all(r.choice and r.choice in r.ladder and not r.refused_on_ladder for r in training)
    assert len(training) == 2 * (73 - len(NOT_PLANNED))


def test_the_others_exit_2_with_one_line_saying_why(rows):
    for r in rows:
        if r.example in NOT_PLANNED:
            assert (r.outcome, r.code) == (NOT_PLANNED[r.example], 2), (r.example, r.gpus, r.message)
            assert r.message.startswith("dsplan: error: ") and "\n" not in r.message


def test_no_chosen_or_laddered_tier_is_refused_by_lf():
    """Plan JSON: refused_by_lf is empty on the choice and every ladder tier, set where LF refuses."""
    marked = {}
    with _workspace() as env:
        for path in sweep.example_files():
            name = path.relative_to(sweep.EXAMPLES).as_posix()
            if name in NOT_PLANNED:
                continue
            code, out, err = sweep.invoke_plan(path, "8x80G", env)
            assert code == 0, (name, err)
            plan = json.loads(out)
            refused = {t["tier"]: t["refused_by_lf"] for t in plan["tiers"] if t["refused_by_lf"]}
            assert not {plan["choice"], *plan["ladder"]} & set(refused), (name, refused)
            marked.update({f"{name} {t}": why for t, why in refused.items()})
    # the examples whose tiers LF refuses: BAdam (ZeRO-2), PiSSA and pre-quantized checkpoints (ZeRO-3)
    assert "main/extras/badam/llama3_full_sft.yaml zero2" in marked
    assert "main/extras/pissa/llama3_lora_sft.yaml zero3" in marked
    assert "PTQ-quantized" in marked["main/train_qlora/llama3_lora_sft_gptq.yaml zero3_offload"]
    assert "PTQ-quantized" in marked["v0.9.3/train_qlora/llama3_lora_sft_aqlm.yaml zero3"]


def test_without_the_configs_the_line_says_where_to_put_them():
    """An empty cache: the examples whose models the catalog lacks stop at one line naming the cache path."""
    models = sweep.load_models()
    rows = sweep.sweep(("8x80G",), bare=True)
    by_model = {}
    for r in rows:
        name = yaml.safe_load((sweep.EXAMPLES / r.example).read_text(encoding="utf-8")).get("model_name_or_path")
        by_model.setdefault(str(name), []).append(r)
    for name, entry in models.items():
        for r in by_model[name]:
            assert (r.outcome, r.code) == ("no-config", 2), (r.example, r.message)
            if entry["place"] == "hub":
                assert f"models--{name.replace('/', '--')}/snapshots/" in r.message, r.message
    others = [r for r in rows if r.example not in NOT_PLANNED and str(yaml.safe_load(
        (sweep.EXAMPLES / r.example).read_text(encoding="utf-8")).get("model_name_or_path")) not in models]
    assert others and all(r.outcome == "ok" for r in others)


def test_pre_quantized_examples_plan_as_quantized_from_the_hf_cache():
    with _workspace() as env:
        code, out, err = sweep.invoke_plan(sweep.EXAMPLES / "main/train_qlora/llama3_lora_sft_awq.yaml", "1x80G", env)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"]["source"].endswith("config.json") and "hub" in plan["model"]["source"]
    assert any("awq-quantized" in w for w in plan["warnings"]), plan["warnings"]


def test_the_fsdp_example_renders_deepspeed_without_fsdp(tmp_path):
    """transformers' Trainer refuses fsdp beside deepspeed; render removes LF's FSDP keys and says so."""
    from dsplan.cli import cli

    example = sweep.EXAMPLES / "main/extras/fp8/llama3_fp8_fsdp_sft.yaml"
    with _workspace() as env:
        r = sweep._runner().invoke(cli, ["render", str(example), "--gpus", "8x80G", "-o", str(tmp_path / "out")],
                                   prog_name="dsplan", env=env)
    assert r.exit_code == 0, r.stderr
    for tier_yaml in (tmp_path / "out").glob("lf_*.yaml"):
        data = yaml.safe_load(tier_yaml.read_text(encoding="utf-8"))
        assert data["deepspeed"] and not {"fsdp", "fsdp_transformer_layer_cls_to_wrap"} & set(data), tier_yaml
    assert "fsdp: ['full_shard', 'auto_wrap'] -> removed" in r.stdout
    assert "fsdp_transformer_layer_cls_to_wrap: 'LlamaDecoderLayer' -> removed" in r.stdout
    assert "transformers 5.6.0 refuses" not in r.stderr


def test_a_token_list_is_not_a_training_config(rows):
    r = next(r for r in rows if r.example == "main/extras/multi_tokens/tokens_cfg.yaml")
    assert "not a LLaMA-Factory training config: none of its keys is an argument of LLaMA-Factory 0.9.5" in r.message


def test_the_sweep_prints_its_table_and_counts(capsys):
    assert sweep.main(["--gpus", "8x80G"]) == 0
    out = capsys.readouterr().out
    assert "73 examples x 1 GPU specs = 73 plans: ok 62, not-training 4, lf-refuses 4, unknown-key 1, no-config 2" \
        in out


@pytest.mark.parametrize("keys, refused", [
    ({"ref_model": "Qwen/Qwen3-4B-Instruct-2507", "ref_model_quantization_bit": 8}, True),
    ({"ref_model": "Qwen/Qwen3-4B-Instruct-2507", "ref_model_quantization_bit": 4}, False),
    ({"ref_model": "Qwen/Qwen3-4B-Instruct-2507", "ref_model_quantization_bit": 4, "quantization_method": "hqq"},
     True),
    ({"ref_model_quantization_bit": 8}, False),  # no ref_model: LoRA's reference is the base, nothing loaded
    ({"ref_model": "Qwen/Qwen3-4B-Instruct-2507", "ref_model_quantization_bit": 8, "pref_loss": "simpo"}, False),
])
def test_a_reference_model_lf_loads_quantized_follows_its_zero3_rules(tmp_path, keys, refused):
    """LF loads a ref_model with the trained model's arguments and ref_model_quantization_bit, through the
    same configure_quantization: bnb 8-bit, HQQ and EETQ refuse ZeRO-3 (checked against LF in the real test)."""
    base = yaml.safe_load((sweep.EXAMPLES / "main/train_lora/qwen3_lora_dpo.yaml").read_text(encoding="utf-8"))
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({**base, **keys}))
    with _workspace() as env:
        code, out, err = sweep.invoke_plan(path, "8x80G", env)
    assert code == 0, err
    tiers = {t["tier"]: t["refused_by_lf"] for t in json.loads(out)["tiers"]}
    assert (tiers["zero3"] is not None, tiers["zero3_offload"] is not None) == (refused, refused), tiers
    assert tiers["zero2"] is None and tiers["zero2_offload"] is None
    if refused:
        assert "(the reference model, loaded" in tiers["zero3"]
