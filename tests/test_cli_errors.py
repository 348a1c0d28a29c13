"""User errors: one line on stderr, exit code 2, nothing written."""

import json
import sys

import pytest
import yaml

from tests.conftest import run_dsplan


def assert_user_error(r, out, needle):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("gpus", ["8x", "eightx64G", "8x64", "0x80G", "8x64Q", "2x2x2x2G"])
def test_bad_gpus(tmp_path, model_dir, gpus):
    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", gpus, "--model", str(model_dir), "-o", str(out))
    assert_user_error(r, out, "--gpus")


def test_unknown_tier(tmp_path, model_dir):
    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", "8x64G", "--model", str(model_dir), "--tier", "zero4", "-o", str(out))
    assert_user_error(r, out, "unknown tier")


def test_missing_model_folder(tmp_path):
    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", "8x64G", "--model", str(tmp_path / "no-such-model"), "-o", str(out))
    assert_user_error(r, out, "does not exist")


@pytest.mark.parametrize("text,needle", [
    ("model_name_or_path: [unclosed\n", "malformed YAML"),
    ("key: value\n  bad indent: x\n", "malformed YAML"),
    ("- just\n- a list\n", "malformed YAML"),
    ("finetuning_type: lorra\n", "finetuning_type"),
    ("per_device_train_batch_size: two\n", "per_device_train_batch_size"),
])
def test_malformed_yaml(tmp_path, model_dir, text, needle):
    user = tmp_path / "u.yaml"
    user.write_text(text)
    out = tmp_path / "out"
    r = run_dsplan("render", str(user), "--gpus", "8x64G", "--model", str(model_dir), "-o", str(out))
    assert_user_error(r, out, needle)


def test_missing_gpus_and_model(tmp_path, model_dir):
    out = tmp_path / "out"
    assert_user_error(run_dsplan("render", "--model", str(model_dir), "-o", str(out)), out, "--gpus")
    assert_user_error(run_dsplan("render", "--gpus", "1x24G", "-o", str(out)), out, "--model")


def test_click_usage_errors_are_one_line(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_dsplan("render", "--gpus", "8x64G", "--bogus", "-o", str(out)), out, "--bogus")
    assert_user_error(run_dsplan("render", "--gpus", "8x64G", "--backend", "metal", "-o", str(out)), out,
                      "--backend")
    assert_user_error(run_dsplan("render", "--gpus", "8x64G", "--micro-batch", "0", "-o", str(out)), out,
                      "--micro-batch")


def test_unwritable_output_folders_are_one_line(tmp_path, model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "sub"
    r = run_dsplan("render", "--gpus", "8x64G", "--model", str(model_dir), "-o", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_dsplan("run", "--gpus", "8x64G", "--model", str(model_dir), "--run-dir", str(out),
                   "--lf-cli", sys.executable)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_broken_config_and_manifest_are_one_line(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 0, "intermediate_size": 8,
                                               "num_hidden_layers": 2, "vocab_size": 10}))
    out = tmp_path / "out"
    assert_user_error(run_dsplan("render", "--gpus", "1x24G", "--model", str(m), "-o", str(out)), out, "zero")
    assert_user_error(run_dsplan("render", "--gpus", "1x24G", "--model", str(m / "config.json.bak"), "-o",
                                 str(out)), out, "does not exist")
    d = tmp_path / "rendered"
    d.mkdir()
    (d / "dsplan.json").write_text("[1, 2]")
    r = run_dsplan("validate", str(d))
    assert r.returncode == 2 and "not a dsplan manifest" in r.stderr and "Traceback" not in r.stderr


def test_full_method_drops_quantization_from_the_users_yaml(tmp_path, model_dir):
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"finetuning_type": "full", "quantization_bit": 4, "dataset": "d"}))
    out = tmp_path / "out"
    r = run_dsplan("render", str(user), "--gpus", "8x80G", "--model", str(model_dir), "--tier", "zero3", "-o",
                   str(out))
    assert r.returncode == 0, r.stderr
    lf = yaml.safe_load((out / "lf_zero3.yaml").read_text())
    assert lf["finetuning_type"] == "full" and "quantization_bit" not in lf
    assert "quantization_bit: 4 -> removed" in r.stdout
